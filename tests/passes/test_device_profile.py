"""DeviceProfile: built-in numbers, validation, JSON round trip, and get_profile's resolution."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from planner.passes import device_profile as dp
from planner.passes.device_profile import BUILTIN_PROFILES, DeviceProfile, get_profile

GPU_BUILTINS = ("h100", "h200", "a100", "rtx4090", "t4")


def _profile(**overrides: object) -> DeviceProfile:
    fields: dict[str, object] = dict(
        name="test",
        device_type="cpu",
        matmul_flops={"float32": 1e11, "bfloat16": 2e11},
        memory_bandwidth=2e10,
        host_bandwidth=None,
        disk_read_bandwidth=1e9,
        disk_write_bandwidth=5e8,
        op_overhead_seconds=2e-6,
        memory_bytes=2**34,
    )
    fields.update(overrides)
    return DeviceProfile(**fields)  # type: ignore[arg-type]


@pytest.fixture
def no_saved_profile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point the default profile path at a file that does not exist."""
    path = tmp_path / "absent" / "profile.json"
    monkeypatch.setenv(dp.PROFILE_ENV_VAR, str(path))
    return path


def test_builtins_exist_with_sane_numbers() -> None:
    assert set(BUILTIN_PROFILES) == {*GPU_BUILTINS, "cpu"}
    for key, profile in BUILTIN_PROFILES.items():
        assert profile.name == key
        assert {"float32", "float16", "bfloat16"} <= set(profile.matmul_flops)
        for value in [*profile.matmul_flops.values(), profile.memory_bandwidth]:
            assert math.isfinite(value) and value > 0
        # Every tier is slower than the one above it.
        assert profile.disk_read_bandwidth < profile.memory_bandwidth
        if profile.has_host_tier:
            assert profile.disk_read_bandwidth < profile.host_bandwidth < profile.memory_bandwidth


def test_gpu_builtins_have_host_tier_and_cpu_does_not() -> None:
    for key in GPU_BUILTINS:
        assert BUILTIN_PROFILES[key].device_type == "cuda"
        assert BUILTIN_PROFILES[key].has_host_tier
        # each copy costs the launching thread its issue (measured on an H200 VM)
        assert BUILTIN_PROFILES[key].copy_issue_seconds == pytest.approx(150e-6)
    cpu = BUILTIN_PROFILES["cpu"]
    assert cpu.device_type == "cpu" and not cpu.has_host_tier and cpu.host_bandwidth is None
    assert cpu.copy_issue_seconds == 0.0  # its copies are priced by copy_compute_share


def test_builtin_datasheet_figures() -> None:
    h100 = BUILTIN_PROFILES["h100"]
    assert h100.flops_per_second("bfloat16") == pytest.approx(989e12)
    assert h100.flops_per_second("float32") == pytest.approx(67e12)
    assert h100.memory_bandwidth == pytest.approx(3.35e12)
    assert BUILTIN_PROFILES["a100"].flops_per_second("float16") == pytest.approx(312e12)
    assert BUILTIN_PROFILES["t4"].flops_per_second("float16") == pytest.approx(65e12)
    assert BUILTIN_PROFILES["rtx4090"].memory_bandwidth == pytest.approx(1.008e12)


def test_flops_per_second_accepts_dtype_spellings() -> None:
    profile = _profile()
    for spelling in ("bfloat16", "bf16", torch.bfloat16, "torch.bfloat16", "BFLOAT16"):
        assert profile.flops_per_second(spelling) == 2e11


def test_flops_per_second_falls_back_to_float32_then_max() -> None:
    assert _profile().flops_per_second("int8") == 1e11
    assert _profile().flops_per_second(torch.float64) == 1e11
    without_fp32 = _profile(matmul_flops={"float16": 3e11, "bfloat16": 2e11})
    assert without_fp32.flops_per_second("float32") == 3e11


def test_dict_round_trip_is_plain_json() -> None:
    for profile in [*BUILTIN_PROFILES.values(), _profile()]:
        data = json.loads(json.dumps(profile.to_dict()))
        assert DeviceProfile.from_dict(data) == profile


def test_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "p.json"
    saved = _profile().save(path)
    assert saved == path and path.is_file()
    assert DeviceProfile.load(path) == _profile()


def test_load_rejects_bad_files(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        DeviceProfile.load(bad_json)
    data = _profile().to_dict()
    data["warp_size"] = 32
    del data["memory_bandwidth"]
    with pytest.raises(ValueError, match="memory_bandwidth.*warp_size"):
        DeviceProfile.from_dict(data)


@pytest.mark.parametrize(
    "overrides",
    [
        {"device_type": "tpu"},
        {"matmul_flops": {}},
        {"matmul_flops": {"float32": -1.0}},
        {"memory_bandwidth": 0.0},
        {"disk_read_bandwidth": math.inf},
        {"disk_write_bandwidth": math.nan},
        {"host_bandwidth": -5.0},
        {"op_overhead_seconds": -1e-6},
        {"copy_issue_seconds": -1e-6},
        {"memory_bytes": 0},
        {"disk_cached_read_bandwidth": 0.0},
        {"disk_cached_write_bandwidth": -1.0},
    ],
)
def test_validation_rejects_bad_numbers(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _profile(**overrides)


def test_profile_is_frozen_and_hashable() -> None:
    flops = {"float32": 1e11}
    profile = _profile(matmul_flops=flops)
    flops["float32"] = 1.0  # the caller's dict is copied, not shared
    assert profile.flops_per_second("float32") == 1e11
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.memory_bandwidth = 1.0  # type: ignore[misc]
    assert hash(profile) == hash(_profile(matmul_flops={"float32": 1e11}))
    assert len({profile, _profile(matmul_flops={"float32": 1e11})}) == 1


def test_get_profile_builtin_names() -> None:
    assert get_profile("h100") is BUILTIN_PROFILES["h100"]
    assert get_profile("T4") is BUILTIN_PROFILES["t4"]
    custom = _profile()
    assert get_profile(custom) is custom


def test_get_profile_loads_a_path(tmp_path: Path) -> None:
    path = _profile(name="from-file").save(tmp_path / "x.json")
    assert get_profile(str(path)).name == "from-file"
    assert get_profile(path).name == "from-file"


def test_get_profile_unknown_name_lists_builtins() -> None:
    with pytest.raises(ValueError, match="unknown device profile 'v100'") as info:
        get_profile("v100")
    for key in BUILTIN_PROFILES:
        assert key in str(info.value)


def test_get_profile_none_uses_env_var_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = _profile(name="calibrated-here").save(tmp_path / "mine.json")
    monkeypatch.setenv(dp.PROFILE_ENV_VAR, str(path))
    assert dp.default_profile_path() == path
    assert get_profile(None).name == "calibrated-here"
    assert get_profile().name == "calibrated-here"


def test_default_path_without_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dp.PROFILE_ENV_VAR, raising=False)
    assert dp.default_profile_path() == Path.home() / ".cache" / "planner" / "profile.json"


def test_get_profile_none_falls_back_to_cpu_builtin(
    monkeypatch: pytest.MonkeyPatch, no_saved_profile: Path
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_profile(None) is BUILTIN_PROFILES["cpu"]


def test_get_profile_none_matches_the_gpu(
    monkeypatch: pytest.MonkeyPatch, no_saved_profile: Path
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    assert get_profile(None) is BUILTIN_PROFILES["a100"]


@pytest.mark.parametrize(
    ("device_name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-40GB", "a100"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("Tesla T4", "t4"),
        ("NVIDIA L4", "h100"),  # unknown: the default
    ],
)
def test_builtin_for_gpu(device_name: str, key: str) -> None:
    assert dp.builtin_for_gpu(device_name) is BUILTIN_PROFILES[key]


def test_disk_rates_use_the_page_cache_only_when_the_files_fit() -> None:
    """Page-cache rates when what a plan may write fits in the share of free memory
    the kernel lets dirty pages take; the disk's rates past it, when free memory is
    unknown, and for profiles that never measured the page cache."""
    base = BUILTIN_PROFILES["cpu"]
    assert base.disk_cached_read_bandwidth is None
    profile = dataclasses.replace(
        base, disk_cached_read_bandwidth=15e9, disk_cached_write_bandwidth=1.5e9
    )
    free = 10 * 2**30
    fits = profile.disk_rates(int(dp.PAGE_CACHE_SHARE * free), free)
    assert (fits.read, fits.write, fits.read_work) == (15e9, 1.5e9, 15e9)
    assert fits.reason.startswith("page cache")
    too_big = profile.disk_rates(int(dp.PAGE_CACHE_SHARE * free) + 1, free)
    assert (too_big.read, too_big.write) == (base.disk_read_bandwidth, base.disk_write_bandwidth)
    assert too_big.read_work == 15e9  # a read still ends in a copy out of the page cache
    assert "exceed" in too_big.reason
    assert profile.disk_rates(1, None).read == base.disk_read_bandwidth
    unmeasured = base.disk_rates(1, free)
    assert unmeasured.read == base.disk_read_bandwidth
    assert unmeasured.read_work == base.memory_bandwidth and "calibrate" in unmeasured.reason


def test_free_memory_is_read_on_linux() -> None:
    free = dp.free_memory_bytes()
    if sys.platform.startswith("linux"):
        assert free is not None and 0 < free
    else:
        assert free is None
