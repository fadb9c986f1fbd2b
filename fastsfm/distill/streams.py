"""Host<->GPU copies of an offloaded set's chunks, overlapped with the chunks' compute.

An offloaded set (``offload=True``: levels and Adam moments in exact-size page-locked host memory,
:mod:`fastsfm.distill.pinned`) reaches the GPU a chunk at a time.  Copied on the compute stream,
every chunk would wait for its upload and every write-back would hold up the next chunk.  Here:

* **uploads** (host -> GPU: the next chunk's levels in each pass, and in pass 2 its moments' stored
  tensors -- float32, bfloat16, or 8-bit codes and scales) are issued on an upload stream *before*
  the current chunk's compute is queued, into fresh device buffers (two chunks' worth are alive at a
  time: double buffering through the caching allocator, each buffer marked used by the compute
  stream with ``record_stream``); the compute stream waits for a chunk's upload event only when it
  takes that chunk;
* **write-backs** (GPU -> host: a chunk's updated levels and moments) run on a download stream
  that first waits for the chunk's optimiser step; their device buffers are marked used by it;
* an upload first waits for the write-backs queued before it (the next step's chunk 0 reads host
  memory that this step's last write-back fills), and :meth:`ChunkStreams.finish` makes the compute
  stream wait for every write-back, so the loop's loss readback -- queued after it -- orders all
  copies before any host read (a checkpoint).

The *order* of the work is the resident path's: chunk by chunk, pass 1 then pass 2, each chunk's
forward, backward and optimiser step in turn; only copies move to other streams (tested on a CPU,
where the copies are synchronous and logged in :attr:`ChunkStreams.events`).  The arithmetic is the
same, so offloaded = resident bit for bit.  ``benches/profile_offload.py`` shows the overlap on a GPU.

Memory: the device holds at most two chunks' copies of levels and moment parts (the planner's per-image
chunk figure counts the levels' copies, the gradient and the float32 moments).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ChunkStreams"]


class ChunkStreams:
    """Upload and download streams of one device (plain synchronous copies without CUDA)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.upload_stream = torch.cuda.Stream(self.device) if cuda else None
        self.download_stream = torch.cuda.Stream(self.device) if cuda else None
        self.events: list[tuple[str, object]] = []  # (what, which) in issue order, for tests and profiles

    def upload(self, tensors: list[Tensor], tag: object = None) -> tuple[list[Tensor], object]:
        """Queue copies of host ``tensors`` to the device; returns the device tensors and a ticket for
        :meth:`take` (the tensors must not be read before it)."""
        self.events.append(("upload", tag))
        if self.upload_stream is None:
            return [t.to(self.device, copy=True) for t in tensors], None
        self.upload_stream.wait_stream(self.download_stream)  # host memory still being written back
        with torch.cuda.stream(self.upload_stream):
            out = [t.to(self.device, non_blocking=True) for t in tensors]
            done = torch.cuda.Event()
            done.record(self.upload_stream)
        return out, done

    def take(self, tensors: list[Tensor], ticket: object, tag: object = None) -> list[Tensor]:
        """Make the compute stream wait for the upload of ``tensors`` and mark them used by it."""
        self.events.append(("take", tag))
        if ticket is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(ticket)
            for t in tensors:
                t.record_stream(compute)
        return tensors

    def download(self, pairs: list[tuple[Tensor, Tensor]], tag: object = None) -> None:
        """Queue ``host.copy_(device)`` for each pair after the compute stream's work so far."""
        self.events.append(("download", tag))
        if self.download_stream is None:
            for host, device in pairs:
                host.copy_(device)
            return
        self.download_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.download_stream):
            for host, device in pairs:
                host.copy_(device, non_blocking=True)
                device.record_stream(self.download_stream)

    def finish(self) -> None:
        """The compute stream waits for every queued write-back (call at the end of a step)."""
        self.events.append(("finish", None))
        if self.download_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.download_stream)
