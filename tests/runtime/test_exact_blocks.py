"""``exact_blocks``: a planned CUDA call runs with expandable segments on, so the
caching allocator splits every block to its request (what the plan counts), and
the caller's allocator settings come back unchanged. The settings' handling is
checked here against a stand-in store and against torch's own parser (which runs
on a CPU build too); the allocator's behaviour itself needs a GPU (marked gpu)."""

from __future__ import annotations

import threading

import pytest
import torch

from planner.runtime import exact_blocks as eb

MiB = 2**20


def test_the_setting_is_added_with_every_other_option_kept() -> None:
    assert eb.with_expandable_segments("", True) == "expandable_segments:True"
    both = "max_split_size_mb:128,roundup_power2_divisions:[256:1,512:2,>:4]"
    assert eb.with_expandable_segments(both, True) == both + ",expandable_segments:True"
    # an earlier mention is replaced, not repeated (calls would grow the string)
    assert (
        eb.with_expandable_segments(
            "expandable_segments:False, garbage_collection_threshold:0.5", True
        )
        == "garbage_collection_threshold:0.5,expandable_segments:True"
    )
    assert eb._enabled("expandable_segments:False,expandable_segments:True")
    assert not eb._enabled("expandable_segments:True,expandable_segments:False")
    assert not eb._enabled("max_split_size_mb:128")


def test_torch_parses_the_settings_it_is_given() -> None:
    """The strings go to torch's own parser, which refuses malformed ones (a
    planned call would fail there); the original settings are restored after."""
    original = eb._get_settings()
    assert original is not None, "torch 2.13 has _accelerator_getAllocatorSettings"
    user = "max_split_size_mb:128,roundup_power2_divisions:[256:1,512:2,>:4]"
    try:
        for on in (True, False):
            composed = eb.with_expandable_segments(user, on)
            eb._set_settings(composed)
            assert eb._get_settings() == composed
            assert eb._enabled(composed) is on
    finally:
        eb._set_settings(eb.with_expandable_segments(original, eb._enabled(original)))


class _Settings:
    """A stand-in for the allocator's settings: what was set, in order."""

    def __init__(self, value: str) -> None:
        self.value = value
        self.history: list[str] = []

    def get(self) -> str:
        return self.value

    def set(self, value: str) -> None:
        self.value = value
        self.history.append(value)


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> _Settings:
    fake = _Settings("max_split_size_mb:256")
    monkeypatch.setattr(eb, "_get_settings", fake.get)
    monkeypatch.setattr(eb, "_set_settings", fake.set)
    return fake


def test_a_cuda_call_turns_the_setting_on_and_gives_the_callers_back(settings: _Settings) -> None:
    with eb.exact_blocks(torch.device("cuda", 1)):
        assert settings.value == "max_split_size_mb:256,expandable_segments:True"
    assert settings.value == "max_split_size_mb:256,expandable_segments:False"
    # a second call starts from what the first gave back: the string does not grow
    with eb.exact_blocks(torch.device("cuda")):
        assert settings.value == "max_split_size_mb:256,expandable_segments:True"
    assert settings.history[-1] == "max_split_size_mb:256,expandable_segments:False"


def test_the_setting_is_given_back_when_the_call_raises(settings: _Settings) -> None:
    with pytest.raises(RuntimeError, match="half-way"):
        with eb.exact_blocks(torch.device("cuda")):
            raise RuntimeError("stopped half-way")
    assert not eb._enabled(settings.value)
    assert eb._depth == 0


def test_nested_and_concurrent_calls_set_it_once(settings: _Settings) -> None:
    """A call within a call (or another thread's call) keeps it on until the last
    one ends: the first to end must not turn it off under the other."""
    inside = threading.Event()
    release = threading.Event()

    def other_call() -> None:
        with eb.exact_blocks(torch.device("cuda")):
            inside.set()
            release.wait(10)

    with eb.exact_blocks(torch.device("cuda")):
        thread = threading.Thread(target=other_call)
        thread.start()
        assert inside.wait(10)
    assert eb._enabled(settings.value), "the other thread's call is still running"
    release.set()
    thread.join(10)
    assert not eb._enabled(settings.value)
    assert len(settings.history) == 2  # on once, off once


@pytest.mark.parametrize(
    "value",
    [
        "expandable_segments:True",
        "backend:cudaMallocAsync",
        "max_split_size_mb:64,expandable_segments:True",
    ],
)
def test_nothing_changes_when_it_is_on_already_or_another_allocator_runs(
    settings: _Settings, value: str
) -> None:
    settings.value = value
    with eb.exact_blocks(torch.device("cuda")):
        pass
    assert settings.history == []


def test_nothing_changes_off_cuda(settings: _Settings) -> None:
    with eb.exact_blocks(torch.device("cpu")):
        pass
    assert settings.history == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_reused_block_is_split_to_the_request_on_cuda() -> None:
    """Without the setting, a cached 3 MiB block taken for a 2.5 MiB request is
    not split (0.5 MiB would remain, under the large pool's 1 MiB) and the meter
    counts 3 MiB; within ``exact_blocks`` the block is split: 2.5 MiB."""
    device = torch.device("cuda")
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    first = torch.empty(3 * MiB, dtype=torch.uint8, device=device)
    after = torch.empty(5 * MiB, dtype=torch.uint8, device=device)  # keeps the 3 MiB apart
    del first  # a cached free 3 MiB block

    def added_by(request: int) -> int:
        before = torch.cuda.memory_allocated(device)
        held = torch.empty(request, dtype=torch.uint8, device=device)
        added = torch.cuda.memory_allocated(device) - before
        del held
        return added

    request = 5 * MiB // 2
    assert added_by(request) == 3 * MiB, "the case this test is about (the block unsplit)"
    with eb.exact_blocks(device):
        assert added_by(request) == request
    del after
