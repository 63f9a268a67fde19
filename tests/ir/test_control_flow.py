"""torch.cond is refused with the user's line and what to do (planner.ir.control_flow)."""

from __future__ import annotations

import pytest
import torch

import planner


class _Cond(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return torch.cond(h.sum() > 0, lambda t: self.b(t).relu(), lambda t: self.b(t) * 2, (h,))


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_torch_cond_is_refused_with_the_users_line(mode: str) -> None:
    """Inference failed while emitting the executor (KeyError: 'true_graph_0');
    training said the model applied an autograd.Function of its own."""
    expected = r"torch\.cond at test_control_flow\.py:\d+.*torch\.where"
    with pytest.raises(planner.CaptureError, match=expected):
        planner.plan(_Cond(), "100%", (torch.randn(8, 16),), mode=mode, time_limit=3)


def test_a_hub_kernel_wrapper_is_not_the_source_line() -> None:
    """transformers calls Llama's rotary embedding (and Mamba's mixer) through the
    ``kernels`` package's wrapper; the stack torch records ends in it, and every
    such op was named ``layer.py:856 in forward``: the model's call is named."""
    from planner.ir.data_dependent import last_user_line

    site = "/usr/lib/python3/site-packages"
    stack = (
        f'File "{site}/transformers/models/llama/modeling_llama.py", line 249, in forward\n'
        f"    query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)\n"
        f'  File "{site}/kernels/_internals/layer/layer.py", line 856, in forward\n'
        f"    return func(*args, **kwargs)\n"
    )
    assert last_user_line(stack) == "modeling_llama.py:249 in forward"


def test_transformers_building_blocks_are_not_the_source_line() -> None:
    """transformers' shared layers (GPT-2's Conv1D in pytorch_utils.py, the loss
    helpers) are named by the modeling file's call, as torch.nn's are."""
    from planner.ir.data_dependent import last_user_line

    site = "/usr/lib/python3/site-packages/transformers"
    stack = (
        f'File "{site}/models/gpt2/modeling_gpt2.py", line 300, in forward\n'
        f"    query_states, key_states, value_states = self.c_attn(hidden_states)\n"
        f'  File "{site}/pytorch_utils.py", line 119, in forward\n'
        f"    x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)\n"
    )
    assert last_user_line(stack) == "modeling_gpt2.py:300 in forward"
    only_library = f'File "{site}/loss/loss_utils.py", line 40, in ForCausalLMLoss\n'
    assert last_user_line(only_library) == "loss_utils.py:40 in ForCausalLMLoss"
