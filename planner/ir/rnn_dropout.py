"""Keep the dropout between a multi-layer RNN's layers when it is decomposed.

torch's decomposition of ``aten.lstm`` / ``aten.gru`` / ``aten.rnn_tanh`` /
``aten.rnn_relu`` (``torch._decomp.decompositions._rnn_helper``, torch 2.13)
sets its dropout to 0 in the first layer's iteration, by a condition that is
never true (``num_layers < i - 1``), so every traced graph of an ``nn.LSTM(...,
num_layers=2, dropout=0.5)`` in training mode computed without that dropout: the
planned step's loss was the ``dropout=0`` model's, its gradients up to 9.4e-3
from eager's, silently (found by the training sweep). ``torch.export`` keeps the
op whole; AOTAutograd and ``run_decompositions`` decompose it through that
helper, which the decomposition looks up by name when it runs.

So while capturing, the helper is replaced by one that applies the dropout where
eager does (``apply_layer_stack`` in ATen's RNN.cpp: after every layer but the
last, in training), through the same ``torch.dropout``, so that it draws the
same random numbers. It is replaced only where torch's still has the faulty
condition; a torch that mended it is left alone.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch._decomp import decompositions

#: the condition in torch's helper that drops the dropout
_FAULT = "num_layers < i - 1"


@functools.cache  # once per process: it reads torch's source
def _faulty() -> bool:
    helper = getattr(decompositions, "_rnn_helper", None)
    if helper is None or not hasattr(decompositions, "params_hiddens"):
        return False
    try:
        return _FAULT in inspect.getsource(helper)
    except (OSError, TypeError):  # no source (a frozen install): cannot tell
        return False


def _rnn_helper_keeping_dropout(
    input: torch.Tensor,
    hidden: Any,
    params: Any,
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    batch_first: bool,
    layer_fn: Any,
) -> tuple[torch.Tensor, list[Any]]:
    """torch's ``_rnn_helper`` (same arguments, same layer calls) with eager's
    dropout between layers."""
    input = input.transpose(0, 1) if batch_first else input
    final_hiddens = []
    for i in range(num_layers):
        cur_params, cur_hidden, bidir_params, bidir_hidden = decompositions.params_hiddens(
            params, hidden, i, bidirectional
        )
        fwd_inp, fwd_hidden = layer_fn(input, cur_hidden, cur_params, has_biases)
        final_hiddens.append(fwd_hidden)
        if bidirectional:
            bwd_inp, bwd_hidden = layer_fn(
                input, bidir_hidden, bidir_params, has_biases, reverse=True
            )
            final_hiddens.append(bwd_hidden)
            input = torch.cat([fwd_inp, bwd_inp], fwd_inp.dim() - 1)
        else:
            input = fwd_inp
        if dropout != 0 and train and i < num_layers - 1:
            input = torch.dropout(input, dropout, train=True)
    input = input.transpose(0, 1) if batch_first else input
    return input, final_hiddens


@contextlib.contextmanager
def rnn_dropout_kept() -> Iterator[None]:
    """While tracing: RNN decompositions apply the dropout between layers."""
    if not _faulty():
        yield
        return
    original = decompositions._rnn_helper
    decompositions._rnn_helper = _rnn_helper_keeping_dropout
    try:
        yield
    finally:
        decompositions._rnn_helper = original
