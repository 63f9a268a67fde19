"""`planner report --checkpoint`: a factory's meta model takes a checkpoint's weights."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from planner.cli import main

FACTORY = """
import torch
from torch import nn


def make_meta_mlp():
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.GELU()) for _ in range(8)])
    return model, (torch.randn(64, 256),)
"""


def test_report_plans_a_meta_model_from_its_checkpoint(tmp_path, capsys) -> None:
    (tmp_path / "meta_mlp.py").write_text(FACTORY)
    with torch.device("cpu"):
        torch.manual_seed(0)
        weights = torch.nn.Sequential(
            *[torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU()) for _ in range(8)]
        ).state_dict()
    save_file(weights, tmp_path / "mlp.safetensors")
    factory = f"{tmp_path}/meta_mlp.py:make_meta_mlp"
    args = ["report", factory, "--budget", "40%", "--profile", "cpu", "--json"]
    assert main([*args, "--checkpoint", str(tmp_path / "mlp.safetensors")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["measured"]["peak_bytes"] <= data["budget_bytes"]
    assert data["read_in_place"]["weights"] > 0  # its disk-home weights, from the file
    assert main([*args, "--checkpoint", str(tmp_path / "missing.safetensors")]) == 1
    assert "cannot read safetensors checkpoint" in capsys.readouterr().err


def test_report_of_a_meta_model_without_a_checkpoint_says_what_to_do(tmp_path, capsys) -> None:
    (tmp_path / "meta_mlp.py").write_text(FACTORY)
    code = main(["report", f"{tmp_path}/meta_mlp.py:make_meta_mlp", "--budget", "40%"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "--checkpoint" in err
