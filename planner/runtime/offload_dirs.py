"""Offload directories name the process that owns them, so that one left behind is
removed by the next planner process that makes one in the same place.

A process that is killed outright (the kernel's OOM killer, ``SIGKILL``, power loss)
cannot run its cleanup, and its directory can hold gigabytes of spilled weights and
activations. Running out of memory is what brings users to this tool, so such kills
are expected. A directory is named ``planner-offload-<host>-<pid>-<random>``:
``<host>`` is a hash of this machine's host name, so a directory that another
machine made on a shared file system is never taken for one of ours, and ``<pid>``
is the owner's process id. Creating a directory first removes every directory in
the same parent that this machine made for a process that no longer exists.

Its owner also holds an exclusive ``flock`` on the directory while it lives
(``hold``), released by the kernel when the process dies however it dies. A
directory is removed only if that lock can be taken, so a live owner in another
PID namespace (containers that share a host name and a directory) keeps its
directory even though its pid means nothing here.

Conservative by construction: a directory whose owner's id has been reused by a
live process stays (until that process ends), and so does any directory not named
this way (made by another user, another machine or an older planner). Off POSIX
systems nothing is swept.
"""

from __future__ import annotations

import os
import shutil
import socket
import warnings
import zlib
from pathlib import Path

from planner.errors import PlannerWarning, listed

try:
    import fcntl
except ImportError:  # not POSIX: no locks, no sweep
    fcntl = None  # type: ignore[assignment]

PREFIX = "planner-offload-"


def _host_tag() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def owner_prefix(pid: int | None = None) -> str:
    """The name prefix of a directory owned by ``pid`` (default: this process)."""
    return f"{PREFIX}{_host_tag()}-{os.getpid() if pid is None else pid}-"


def _owner(name: str) -> tuple[str, int] | None:
    """(host tag, pid) from a directory name made by ``owner_prefix``, else None."""
    if not name.startswith(PREFIX):
        return None
    parts = name[len(PREFIX) :].split("-", 2)
    if len(parts) != 3 or len(parts[0]) != 8 or not (parts[1].isascii() and parts[1].isdigit()):
        return None
    if len(parts[1]) > 10:  # no pid is that large
        return None
    return parts[0], int(parts[1])


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # POSIX only: elsewhere it would end the process
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # EPERM: it exists, someone else's
        return True
    return True


def hold(path: str | os.PathLike[str]) -> int | None:
    """Take the owner's lock on directory ``path``; returns the descriptor that
    holds it (close it to release), or None where locks are not available."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _try_take(path: Path) -> int | None:
    """The owner's lock on ``path`` if nobody holds it, else None."""
    try:
        return hold(path)
    except OSError:
        return None


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def remove_stale(parent: str | os.PathLike[str]) -> list[tuple[Path, int]]:
    """Remove the offload directories under ``parent`` that this machine made for
    processes that no longer exist; return (path, bytes) of each one removed, and
    warn once naming them. Never raises: a directory that cannot be listed or
    removed is left where it is."""
    host = _host_tag()
    removed: list[tuple[Path, int]] = []
    if fcntl is None:
        return removed
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        owner = _owner(entry.name)
        if owner is None or owner[0] != host or owner[1] == os.getpid():
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or _process_exists(owner[1]):
                continue
        except OSError:
            continue
        path = Path(entry.path)
        lock = _try_take(path)
        if lock is None:  # its owner lives (in another PID namespace)
            continue
        try:
            nbytes = _tree_bytes(path)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(lock)
        if not path.exists():
            removed.append((path, nbytes))
    if removed:
        total = sum(nbytes for _, nbytes in removed)
        names = listed([path.name for path, _ in removed], 3)
        warnings.warn(
            f"planner removed {len(removed)} offload director"
            f"{'y' if len(removed) == 1 else 'ies'} ({total / 2**20:.1f} MiB) from "
            f"{os.fspath(parent)!r} that processes which no longer run left behind "
            f"(killed before they could clean up): {names}",
            PlannerWarning,
            stacklevel=2,
        )
    return removed
