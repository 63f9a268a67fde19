"""A quantize= that is neither None, a format string nor a non-empty mapping is a
ValueError saying what to pass (was a raw AttributeError, and {} said "one format
for all kinds")."""

import pytest
import torch

import planner


@pytest.mark.parametrize(
    "bad", [8, ["int8"], ("int8",), {}, {"weights": ["int8"]}, {"weights": None}]
)
def test_a_bad_quantize_argument_says_what_to_pass(bad):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"quantize=.*'weights': 'int8'"):
        planner.plan(m, "60%", example_inputs=(torch.randn(4, 16),), quantize=bad, time_limit=1)
