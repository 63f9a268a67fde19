"""Ops whose kernel reads autograd's grad mode: run with it on where a backward
reads the buffer they make only then.

On a CPU, ``nn.LSTM`` in training takes oneDNN's path when its input does not
require grad: the joint graph calls ``mkldnn_rnn_layer`` per layer and passes its
fourth output, a workspace, to ``mkldnn_rnn_layer_backward``. The kernel makes
that workspace only with grad mode on (its ``train`` argument, traced False, is
not what it reads). The executor runs a training forward with grad mode off
(inside ``autograd.Function.forward``), and the backward then raised "Expected a
proper Tensor but got None ... 'workspace'" at the first step; the workspace
pass, under ``no_grad`` too, measured the buffer as the fake kernel's 0 bytes
(270,336 for a layer of hidden size 64 over 32 steps of batch 2). Run here with
grad mode on, over detached arguments (no autograd history is recorded), the
kernel makes the workspace, as it does in eager.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

aten = torch.ops.aten

#: op -> the position of the output it makes only with grad mode on
BUFFER_WITH_GRAD_MODE: dict[Any, int] = {aten.mkldnn_rnn_layer.default: 3}


def needs_grad_mode(node: torch.fx.Node) -> bool:
    """Whether ``node`` must run with grad mode on: its op makes a buffer only
    then, and the graph reads that buffer (a training graph's backward)."""
    position = BUFFER_WITH_GRAD_MODE.get(node.target)
    return position is not None and any(
        user.target is operator.getitem and user.args[1] == position and user.users
        for user in node.users
    )


@functools.cache
def with_grad_mode(target: Any) -> Callable[..., Any]:
    """``target`` called with grad mode on over detached tensor arguments (one
    function per op, so the executor binds one name)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with torch.enable_grad():
            return target(*args, **kwargs)

    call.__name__ = f"{target._schema.name.rpartition('::')[2]}_with_grad_mode"
    return call


def as_run(node: torch.fx.Node) -> Callable[..., Any]:
    """What runs ``node``'s op as the executor does: the op, or the op with grad
    mode on (``needs_grad_mode``)."""
    return with_grad_mode(node.target) if needs_grad_mode(node) else node.target  # type: ignore[return-value]
