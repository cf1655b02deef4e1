"""safetensors files written straight from tensor memory, by direct I/O where the disk allows it.

A checkpoint of the default language model is 1.5 GB (weights and two Adam moments), written after
an update while the next rollout runs. Buffered writes copy every byte into the page cache and the
kernel writes it back later, all on the same two cores as training (benchmarks/checkpoint.py
measured 1.1-1.25x the time per update with a checkpoint every update). With O_DIRECT the disk
reads the bytes from the tensors themselves: no copy, no cache, next to no CPU.
Not safetensors' own save_file: it first copies every tensor into one bytes object while holding
the GIL (stalling training for a background write) and refuses views of one buffer, which is what
our flat parameters are.

O_DIRECT wants file offsets, lengths and memory addresses in whole blocks. The file therefore lists
tensors in memory order within each storage (the views of a flat parameter buffer become one run of
bytes), and the header is padded with spaces, as the format allows, so that the largest run sits at
the same offset within a block in the file as in memory. Whatever is left over (the header, small
tensors, the ragged ends of runs, runs that cannot be aligned) goes through a small aligned bounce
buffer. Where direct I/O is refused (tmpfs, other systems) the whole file is written the plain way,
which is also the naive twin the tests compare against.
"""
from __future__ import annotations

import bisect
import errno
import json
import mmap
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
BLOCK = 4096
"""Direct-I/O granularity: a multiple of every common logical sector and DMA alignment (512, 4096)."""
BOUNCE_BYTES = 8 << 20
DIRECT_CHUNK = 64 << 20
"""Bytes per direct write call: big enough for the disk to stream, small enough to pin briefly."""


def _bytes_of(t: torch.Tensor, start: int, length: int) -> np.ndarray:
    """A uint8 numpy view of `length` bytes of t's storage from byte `start` (no copy)."""
    view = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage(), start, (length,))
    return view.numpy()


def _layout(tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Tensors in file order: storages by their first name, memory order within a storage."""
    items = {name: t.detach() if t.is_contiguous() else t.detach().contiguous() for name, t in tensors.items()}
    first: dict[int, str] = {}
    for name in sorted(items):
        first.setdefault(items[name].untyped_storage().data_ptr(), name)
    return sorted(items.items(), key=lambda it: (first[it[1].untyped_storage().data_ptr()],
                                                 it[1].storage_offset(), it[0]))


def _runs(layout: list[tuple[str, torch.Tensor]]) -> list[tuple[int, np.ndarray, int]]:
    """(data offset, bytes, memory address) of each run of tensors adjacent in one storage."""
    runs: list[list] = []  # [data offset, tensor, start byte in storage, length]
    offset = 0
    for _, t in layout:
        size = t.numel() * t.element_size()
        if size:
            start = t.storage_offset() * t.element_size()
            last = runs[-1] if runs else None
            if (last is not None and last[0] + last[3] == offset and last[2] + last[3] == start
                    and last[1].untyped_storage().data_ptr() == t.untyped_storage().data_ptr()):
                last[3] += size
            else:
                runs.append([offset, t, start, size])
        offset += size
    return [(off, _bytes_of(t, start, size), t.untyped_storage().data_ptr() + start) for off, t, start, size in runs]


def _header(layout: list[tuple[str, torch.Tensor]], metadata: Optional[dict], align_to: Optional[tuple[int, int]]) -> bytes:
    """Length prefix plus JSON header, padded so the data starts 8-byte aligned and, given
    align_to=(data offset, address), so that byte lands at address's offset within a block."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in layout:
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    pad = -(8 + len(head)) % 8
    if align_to is not None and (align_to[1] - align_to[0]) % 8 == 0:
        pad = (align_to[1] - align_to[0] - 8 - len(head)) % BLOCK
    head += b" " * pad
    return len(head).to_bytes(8, "little") + head


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict] = None,
                      direct: bool = True) -> None:
    """Write `tensors` as a safetensors file without copying them (see the module docstring). An
    existing file is overwritten in place, so its blocks are reused rather than freed and allocated
    again. tests/test_checkpoint.py reads files back through safetensors' load_file and checks
    direct and plain writes agree."""
    layout = _layout(tensors)
    runs = _runs(layout)
    largest = max(runs, key=lambda r: r[1].nbytes, default=None)
    head = _header(layout, metadata, None if largest is None else (largest[0], largest[2]))
    pieces = [(0, np.frombuffer(head, dtype=np.uint8))] + [(len(head) + off, data) for off, data, _ in runs]
    total = len(head) + sum(t.numel() * t.element_size() for _, t in layout)
    fd = _open_direct(path) if direct else None
    if fd is not None:
        try:
            _write_direct(fd, pieces, [(len(head) + off, data, addr) for off, data, addr in runs], total)
            return
        except OSError as e:  # a file system that opens O_DIRECT but refuses the writes
            if e.errno != errno.EINVAL:
                raise
        finally:
            os.close(fd)
    _write_plain(path, pieces, total)


def _open_direct(path: Path) -> Optional[int]:
    """A descriptor for direct writes to `path`, or None where the system or file system has none."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise


def _write_plain(path: Path, pieces: list[tuple[int, np.ndarray]], total: int) -> None:
    with open(path, "r+b" if path.exists() else "wb") as f:
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
        f.truncate(total)


def _write_direct(fd: int, pieces: list[tuple[int, np.ndarray]], runs: list[tuple[int, np.ndarray, int]],
                  total: int) -> None:
    """Whole blocks: straight from memory where a run's file offset and address agree within a
    block, through the bounce buffer elsewhere; the file is cut to `total` at the end."""
    direct = []
    for offset, data, addr in runs:
        if (addr - offset) % BLOCK == 0:
            lo, hi = -(-offset // BLOCK) * BLOCK, (offset + data.nbytes) // BLOCK * BLOCK
            if hi > lo:
                direct.append((lo, hi, data[lo - offset:hi - offset]))
    bounce = mmap.mmap(-1, BOUNCE_BYTES)  # page-aligned
    try:
        position = 0
        for lo, hi, data in direct:
            _write_bounced(fd, pieces, position, lo, bounce)
            for start in range(0, hi - lo, DIRECT_CHUNK):
                _pwrite_all(fd, data[start:start + DIRECT_CHUNK], lo + start)
            position = hi
        _write_bounced(fd, pieces, position, -(-total // BLOCK) * BLOCK, bounce)
    finally:
        bounce.close()
    os.ftruncate(fd, total)


def _write_bounced(fd: int, pieces: list[tuple[int, np.ndarray]], lo: int, hi: int, bounce: mmap.mmap) -> None:
    """Bytes [lo, hi) of the file (whole blocks; past the data they are zeros) via `bounce`."""
    buf = np.frombuffer(bounce, dtype=np.uint8)
    starts = [offset for offset, _ in pieces]
    for chunk in range(lo, hi, len(buf)):
        end = min(chunk + len(buf), hi)
        out = buf[:end - chunk]
        out[:] = 0
        i = max(bisect.bisect_right(starts, chunk) - 1, 0)
        while i < len(pieces) and pieces[i][0] < end:
            offset, data = pieces[i]
            a, b = max(offset, chunk), min(offset + data.nbytes, end)
            if b > a:
                out[a - chunk:b - chunk] = data[a - offset:b - offset]
            i += 1
        _pwrite_all(fd, out, chunk)


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(data)
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
