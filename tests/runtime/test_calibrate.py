"""calibrate(): measures positive, finite numbers, cleans up its files, and saves a
profile that get_profile(None) picks up."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from planner.passes import device_profile as dp
from planner.passes.device_profile import DeviceProfile, get_profile
from planner.runtime import calibrate as cal


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("calibrate-disk")


@pytest.fixture(scope="module")
def quick_profile(disk_dir: Path) -> DeviceProfile:
    """One quick calibration shared by the tests (it takes a few seconds)."""
    return cal.calibrate("cpu", disk_dir=str(disk_dir), quick=True)


def _positive_finite(value: float) -> bool:
    return math.isfinite(value) and value > 0


def test_quick_calibration_numbers_are_positive_and_finite(quick_profile: DeviceProfile) -> None:
    profile = quick_profile
    assert profile.device_type == "cpu"
    assert profile.host_bandwidth is None and not profile.has_host_tier
    assert "float32" in profile.matmul_flops
    for value in profile.matmul_flops.values():
        assert _positive_finite(value)
    for value in (
        profile.memory_bandwidth,
        profile.disk_read_bandwidth,
        profile.disk_write_bandwidth,
        profile.op_overhead_seconds,
        profile.disk_cached_read_bandwidth,
        profile.disk_cached_write_bandwidth,
    ):
        assert value is not None and _positive_finite(value)
    assert profile.memory_bytes is not None and profile.memory_bytes > 0


def test_quick_calibration_is_plausible(quick_profile: DeviceProfile) -> None:
    """Loose physical bounds: catches unit slips (bits vs bytes, ms vs s), not slow machines."""
    assert 1e8 < quick_profile.flops_per_second("float32") < 1e14
    assert 1e8 < quick_profile.memory_bandwidth < 1e13
    assert 1e-8 < quick_profile.op_overhead_seconds < 1e-2
    # a copy through the store costs something fixed, and well under 50 ms
    for latency in (
        quick_profile.disk_read_latency_seconds,
        quick_profile.disk_write_latency_seconds,
    ):
        assert 0 <= latency < 5e-2
    assert quick_profile.disk_write_latency_seconds > 0
    # both int8 passes measured, and neither far above what memory could stream
    for bandwidth in (quick_profile.quantize_bandwidth, quick_profile.dequantize_bandwidth):
        assert bandwidth is not None and 1e6 < bandwidth < 10 * quick_profile.memory_bandwidth


def test_profiles_saved_before_copy_latencies_still_load(tmp_path: Path) -> None:
    data = get_profile("cpu").to_dict()
    del data["disk_read_latency_seconds"], data["disk_write_latency_seconds"]
    old = DeviceProfile.from_dict(data)
    assert old.disk_read_latency_seconds == old.disk_write_latency_seconds == 0.0


def test_calibrated_profile_round_trips_through_json(
    quick_profile: DeviceProfile, tmp_path: Path
) -> None:
    assert DeviceProfile.from_dict(json.loads(json.dumps(quick_profile.to_dict()))) == quick_profile
    assert DeviceProfile.load(quick_profile.save(tmp_path / "p.json")) == quick_profile


def test_temporary_files_are_removed(quick_profile: DeviceProfile, disk_dir: Path) -> None:
    assert list(disk_dir.iterdir()) == []


def test_temporary_files_are_removed_on_failure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def failing_read(path: Path, buffer: bytearray) -> tuple[int, float]:
        assert path.is_file()  # the file existed while measuring
        raise OSError("disk gone")

    monkeypatch.setattr(cal, "_read_file", failing_read)
    tiny = cal.CalibrationSizes(
        repeats=1,
        matmul_target_seconds=0.0,
        matmul_max_n=256,
        copy_bytes=cal._MiB,
        disk_bytes=cal._MiB,
        host_copy_bytes=cal._MiB,
        overhead_ops=1,
    )
    with pytest.raises(OSError, match="disk gone"):
        cal.measure_disk_bandwidth(str(tmp_path), tiny)
    assert list(tmp_path.iterdir()) == []


def test_save_default_is_found_by_get_profile(
    quick_profile: DeviceProfile, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    target = tmp_path / "cache" / "profile.json"
    monkeypatch.setenv(dp.PROFILE_ENV_VAR, str(target))
    assert cal.save_default(quick_profile) == target
    assert get_profile(None) == quick_profile


def test_cli_prints_json_and_saves(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stub = dp.BUILTIN_PROFILES["cpu"]
    monkeypatch.setattr(cal, "calibrate", lambda *args, **kwargs: stub)
    monkeypatch.setenv(dp.PROFILE_ENV_VAR, str(tmp_path / "p.json"))
    cal.main(["--quick", "--save"])
    printed = capsys.readouterr().out
    assert json.loads(printed[: printed.rindex("}") + 1]) == stub.to_dict()
    assert DeviceProfile.load(tmp_path / "p.json") == stub


def test_unsupported_devices_are_rejected() -> None:
    with pytest.raises(ValueError, match="meta"):
        cal.calibrate("meta", quick=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_without_cuda_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        cal.calibrate("cuda", quick=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_calibration_measures_host_tier(tmp_path: Path) -> None:
    profile = cal.calibrate("cuda", disk_dir=str(tmp_path), quick=True)
    assert profile.device_type == "cuda" and profile.has_host_tier
    assert profile.host_bandwidth is not None and _positive_finite(profile.host_bandwidth)
    assert profile.host_bandwidth < profile.memory_bandwidth
    assert list(tmp_path.iterdir()) == []
