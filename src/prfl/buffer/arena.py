"""The file behind a file-backed prefix buffer (:class:`SlotArena`): each slot's values in a
page-aligned region mapped on its own, whose pages go back to the kernel once read."""

from __future__ import annotations

import mmap
import os
import tempfile
import weakref

import torch

VALUE_DTYPE = torch.float32  # every value the buffer stores is fp32
_DTYPE = VALUE_DTYPE


class SlotArena:
    """fp32 vectors in one (unlinked) file: each stored vector is a tensor over its own mapping
    of a page-aligned region; :meth:`release` drops its pages from the process (the data stays in
    the file and the page cache), :meth:`free` returns its region for reuse by a vector of the
    same page count."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        os.makedirs(directory, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="prfl-buffer-", suffix=".f32", dir=directory)
        os.unlink(name)  # the file goes away with the process
        self._fd = fd
        self.size = 0  # bytes of the file
        self._free: dict[int, list[int]] = {}  # region length -> offsets
        self._maps: dict[int, tuple[mmap.mmap, int, int]] = {}  # data_ptr -> (mapping, offset, length)
        self._finalizer = weakref.finalize(self, os.close, fd)

    def store(self, values: torch.Tensor) -> torch.Tensor:
        """Copy ``values`` (1-D fp32) into the file; the returned tensor reads and writes it."""
        n = int(values.numel())
        length = max(mmap.PAGESIZE, -(-n * _DTYPE.itemsize // mmap.PAGESIZE) * mmap.PAGESIZE)
        spare = self._free.get(length)
        if spare:
            offset = spare.pop()
        else:
            offset = self.size
            self.size += length
            os.ftruncate(self._fd, self.size)
        mapping = mmap.mmap(self._fd, length, offset=offset)
        out = torch.frombuffer(mapping, dtype=_DTYPE, count=n) if n else torch.empty(0, dtype=_DTYPE)
        out.copy_(values)
        self._maps[out.data_ptr()] = (mapping, offset, length)
        mapping.madvise(mmap.MADV_DONTNEED)  # written through to the page cache
        return out

    def release(self, t: torch.Tensor, start: int = 0, stop: int | None = None) -> None:
        """Hand the pages of a stored tensor (of its elements ``start:stop``, widened to whole
        pages) back to the kernel; they are read again on next use."""
        entry = self._maps.get(t.data_ptr())
        if entry is None:
            return
        if start == 0 and stop is None:
            entry[0].madvise(mmap.MADV_DONTNEED)
            return
        page, length = mmap.PAGESIZE, entry[2]
        lo = start * _DTYPE.itemsize // page * page
        hi = length if stop is None else min(length, -(-stop * _DTYPE.itemsize // page) * page)
        if hi > lo:
            entry[0].madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def free(self, t: torch.Tensor) -> None:
        """Forget a stored tensor; its region is reused. Do not use ``t`` afterwards."""
        entry = self._maps.pop(t.data_ptr(), None)
        if entry is not None:
            entry[0].madvise(mmap.MADV_DONTNEED)
            self._free.setdefault(entry[2], []).append(entry[1])
