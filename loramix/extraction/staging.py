"""Tensors read from their files straight into GPU memory, at the speed of the page cache.

A tensor read whole into freshly allocated host memory costs more than the copy itself: every page of the new buffer
is faulted in and zeroed by the kernel (3.5× the read on the 2-core CPU), and a CUDA copy from such pageable memory
goes through the driver's own staging buffer, synchronously. `Staging` instead reads each tensor's bytes (a
`TensorSource.stored` range) in chunks of rows into two pinned host buffers that it keeps, and sends each chunk to
the device on its own CUDA stream while the next one is read: no host allocation per tensor, and the disk (page
cache) and the copy engine work at once. One `Staging` per reading thread (it holds that thread's buffers); tensors
that are not stored as such (dequantized, assembled, a legacy ``.bin``) are read as before and sent whole.
"""

from __future__ import annotations

import math
import threading

import torch

from loramix.extraction.tensors import TensorSource

CHUNK_BYTES = 64 << 20  # rows per send: large enough for the copy engine, small enough to overlap with the reads


class Staging:
    """Reads tensors onto ``device`` through two pinned buffers of ``chunk`` bytes (plain ones off CUDA)."""

    def __init__(self, device: torch.device, chunk: int = CHUNK_BYTES) -> None:
        self.device, self.chunk = device, chunk
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        self.sent: list[torch.cuda.Event | None] = [None, None]  # the send still reading each buffer

    def read(self, source: TensorSource, name: str) -> torch.Tensor:
        """Tensor ``name`` of ``source`` on the device, as stored (same dtype and bytes)."""
        entry = source.stored(name)
        if entry is None or entry.tensor is not None or not entry.shape or not entry.nbytes:
            return source.read(name).to(self.device)
        out = torch.empty(entry.shape, dtype=entry.dtype, device=self.device)
        per_chunk = max(1, self.chunk // (math.prod(entry.shape[1:]) * entry.dtype.itemsize))
        if self.stream is not None:  # ``out`` may reuse memory that queued work on the default stream still reads
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        for index, start in enumerate(range(0, entry.shape[0], per_chunk)):
            slot = index % 2
            if self.sent[slot] is not None:
                self.sent[slot].synchronize()  # its last send is done: the buffer may be overwritten
            stop = min(start + per_chunk, entry.shape[0])
            rows = entry.rows(start, stop, self.buffers[slot])  # a row wider than the chunk reads a buffer of its own
            if self.stream is None:
                out[start:stop] = rows
                continue
            with torch.cuda.stream(self.stream):
                out[start:stop].copy_(rows, non_blocking=True)
                self.sent[slot] = self.stream.record_event()
        if self.stream is not None:
            self.stream.synchronize()  # whole before any other stream uses it
        return out


class ThreadStaging(threading.local):
    """One `Staging` per thread that reads (pinned buffers and a stream are one thread's), made on its first read."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.staging = device, None

    def get(self) -> Staging:
        if self.staging is None:
            self.staging = Staging(self.device)
        return self.staging
