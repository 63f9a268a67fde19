"""Offload directories left by processes that were killed are removed by the next
store made in the same place; every other directory stays."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from planner.runtime.offload_dirs import PREFIX, owner_prefix, remove_stale
from planner.runtime.store import DiskStore


def _dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _left_dir(parent, prefix: str) -> str:
    path = parent / f"{prefix}abc123"
    path.mkdir()
    (path / "k-0001.bin").write_bytes(b"\0" * 4096)
    return path.name


def test_a_killed_process_directory_is_removed_by_the_next_store(tmp_path):
    """End to end: a process that spilled a tensor and was killed with SIGKILL
    leaves its directory; the next DiskStore made there removes it, with a warning."""
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from planner.runtime.store import DiskStore
        store = DiskStore({str(tmp_path)!r})
        store.write("x", torch.ones(1024))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    (left,) = os.listdir(tmp_path)
    assert left.startswith(PREFIX) and os.listdir(tmp_path / left)

    with pytest.warns(UserWarning, match=r"removed 1 offload directory .* no longer run"):
        store = DiskStore(tmp_path)
    try:
        assert os.listdir(tmp_path) == [store.root.name]
    finally:
        store.close()
    assert os.listdir(tmp_path) == []


def test_only_directories_of_ended_processes_on_this_machine_are_removed(tmp_path):
    dead = _left_dir(tmp_path, owner_prefix(_dead_pid()))
    live = _left_dir(tmp_path, owner_prefix(os.getppid()))  # pytest's parent lives
    mine = _left_dir(tmp_path, owner_prefix())
    other_host = _left_dir(tmp_path, f"{PREFIX}00000000-{_dead_pid()}-")
    unnamed = _left_dir(tmp_path, PREFIX)  # an older planner's: owner unknown
    (tmp_path / "notes.txt").write_text("the user's")

    with pytest.warns(UserWarning, match=dead):
        removed = remove_stale(tmp_path)

    assert [(path.name, nbytes) for path, nbytes in removed] == [(dead, 4096)]
    assert sorted(os.listdir(tmp_path)) == sorted([live, mine, other_host, unnamed, "notes.txt"])


def test_a_parent_that_cannot_be_listed_is_left_alone(tmp_path):
    assert remove_stale(tmp_path / "missing") == []


def test_store_directories_are_named_for_their_process(tmp_path):
    store = DiskStore(tmp_path)
    try:
        assert store.root.name.startswith(owner_prefix())
        store.write("x", torch.zeros(3))
    finally:
        store.close()


def test_a_directory_whose_owner_holds_its_lock_stays(tmp_path):
    """An owner in another PID namespace: its pid means nothing here, but it holds
    the directory's lock, so the directory is not removed."""
    name = _left_dir(tmp_path, owner_prefix(_dead_pid()))
    script = textwrap.dedent(
        f"""
        import sys, time
        from planner.runtime.offload_dirs import hold
        fd = hold({str(tmp_path / name)!r})
        print("held" if fd is not None else "not held", flush=True)
        sys.stdin.read()
        """
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "held"
        assert remove_stale(tmp_path) == []
        assert os.listdir(tmp_path) == [name]
    finally:
        owner.communicate("")
    with pytest.warns(UserWarning, match=name):  # the lock died with its owner
        assert [path.name for path, _ in remove_stale(tmp_path)] == [name]
