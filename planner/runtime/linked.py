"""Weights read where they already lie: regions of files the offload store does not own.

A weight attached from a safetensors checkpoint (``attach_checkpoint``) is a view
of the checkpoint's memory map. Homed on disk, and written by nothing (inference: no
weight the plan writes; training: a frozen one), it is read from the checkpoint
itself instead of being copied into the offload store (``DiskStore.link``):
planning writes nothing for it (a model as large as the disk's free space still
plans, and no copy is made at disk speed), and the disk holds its bytes once.

The checkpoint is only ever read, through a descriptor opened when the first of
its weights is linked: copies ``pread`` from it, and a read by map maps just the
weight's pages of it, private (copy-on-write: a write would never reach the file),
unmapped once the tensor is freed, as a store file's map is. The attached view's
own map is not used: it spans the whole file and lives as long as the model's
tensor, so every page read through it would stay mapped, and the page cache could
not drop it between calls. A checkpoint rewritten after planning (its size or
modification time changed) is an error at the next read, as a changed offload
file is. One replaced or deleted is not: the open descriptor still holds the
bytes the plan was made with.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from planner.errors import PlannerError


class LinkedFileChanged(PlannerError):
    """A file that weights are read from in place was rewritten after planning."""


@dataclass
class _OpenFile:
    fd: int
    #: (size, modification time) when opened: what a rewrite changes
    stamp: tuple[int, int]
    keys: set[str]


@dataclass(frozen=True)
class _Region:
    path: str
    byte_offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _file_stamp(st: os.stat_result) -> tuple[int, int]:
    return (st.st_size, st.st_mtime_ns)


def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file ``tensor`` is a dense view of a map of (``torch.from_file``), so
    that its bytes can be read from the file at one offset; else None."""
    filename = getattr(tensor.untyped_storage(), "filename", None)
    dense = tensor.device.type == "cpu" and tensor.is_contiguous()
    return filename if dense else None


class LinkedRegions:
    """Keys whose bytes are a region of another file, each read from there."""

    def __init__(self) -> None:
        self._regions: dict[str, _Region] = {}
        self._files: dict[str, _OpenFile] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._regions

    def __len__(self) -> int:
        return len(self._regions)

    def summary(self) -> dict[str, Any]:
        """How many keys are read in place, their bytes, and from which files."""
        return {
            "weights": len(self._regions),
            "bytes": sum(r.nbytes for r in self._regions.values()),
            "files": sorted({r.path for r in self._regions.values()}),
        }

    def link(self, key: str, tensor: torch.Tensor) -> bool:
        """Read ``key`` from where ``tensor`` lies from now on; False (nothing
        done) where that cannot be (see ``mapped_file``, or the file cannot be opened)."""
        path = mapped_file(tensor)
        if path is None:
            return False
        nbytes = tensor.numel() * tensor.element_size()
        byte_offset = int(tensor.storage_offset()) * tensor.element_size()
        opened = self._files.get(path)
        if opened is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                return False
            opened = self._files[path] = _OpenFile(fd, _file_stamp(os.fstat(fd)), set())
        if opened.stamp[0] < byte_offset + nbytes:  # not the file the map was made of
            self._release_if_unused(path)
            return False
        self.forget(key)
        opened.keys.add(key)
        self._regions[key] = _Region(path, byte_offset, nbytes, tensor.dtype, tuple(tensor.shape))
        return True

    def read_into(self, key: str, out: memoryview) -> None:
        """Fill ``out`` (the region's size) from the file."""
        region = self._regions[key]
        fd = self._checked(key, region)
        done = 0
        while done < region.nbytes:
            got = os.preadv(fd, [out[done : region.nbytes]], region.byte_offset + done)
            if got == 0:
                raise self._changed(key, region)  # shorter than when linked
            done += got

    def map_private(self, key: str) -> torch.Tensor:
        """The region as a tensor over a private map of its pages, checked like a
        read (see the module docstring)."""
        region = self._regions[key]
        fd = self._checked(key, region)
        if region.nbytes == 0:
            return torch.empty(region.shape, dtype=region.dtype)
        start = region.byte_offset - region.byte_offset % mmap.ALLOCATIONGRANULARITY
        pages = mmap.mmap(
            fd,
            region.byte_offset + region.nbytes - start,
            flags=mmap.MAP_PRIVATE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=start,
        )
        raw = np.frombuffer(pages, dtype=np.uint8)[region.byte_offset - start :]
        return torch.from_numpy(raw).view(region.dtype).reshape(region.shape)

    def forget(self, key: str) -> None:
        region = self._regions.pop(key, None)
        if region is not None:
            self._files[region.path].keys.discard(key)
            self._release_if_unused(region.path)

    def close(self) -> None:
        for opened in self._files.values():
            os.close(opened.fd)
        self._files.clear()
        self._regions.clear()

    def _release_if_unused(self, path: str) -> None:
        opened = self._files.get(path)
        if opened is not None and not opened.keys:
            os.close(opened.fd)
            del self._files[path]

    def _checked(self, key: str, region: _Region) -> int:
        opened = self._files[region.path]
        if _file_stamp(os.fstat(opened.fd)) != opened.stamp:
            raise self._changed(key, region)
        return opened.fd

    def _changed(self, key: str, region: _Region) -> LinkedFileChanged:
        return LinkedFileChanged(
            f"{region.path} was written after planning (its size or modification time "
            f"changed), and the planned module reads {key!r} from it in place (a weight "
            f"homed on disk is read from its checkpoint, not copied): plan the model "
            f"again. To replace a checkpoint a planned module uses, save the new one "
            f"under another name or move it into place (a rename): the module keeps "
            f"reading the file it was planned with"
        )
