"""A pool of fixed-size pages in two tiers: the memory behind a paged optimizer.

Optimizer state is laid out in one flat byte address space, cut into pages of ``page_bytes``.
At most ``capacity`` pages are *resident* in the fast tier (the device's memory: one buffer of
slots); the others live in a slower tier and are copied back before they are needed:

- parameters on CUDA: the slow tier is pinned CPU memory (copies run asynchronously);
- parameters on the CPU: it is a memory-mapped file under ``offload_dir``, so a page that is
  out really is on disk (or in the OS page cache) and paging can be watched and timed here.

When a page must come in and no slot is free, the least recently used page that is not needed
right now is written out (*evicted*) first. This is what the GPU driver does for bitsandbytes'
paged optimizers with unified memory, made explicit and counted (:meth:`PagePool.stats`).

A *segment* is a range of the address space (one state tensor of one parameter). Pages never
touched are zeros without being stored anywhere, so laying out a large state costs nothing.
"""

from __future__ import annotations

import heapq
import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

#: Segments start on multiples of this many bytes, so page boundaries inside an 8-bit state
#: fall on whole blocks of 256 elements (and inside a float32 state on whole elements).
ALIGN = 256


@dataclass(frozen=True)
class Segment:
    """Bytes ``[offset, offset + nbytes)`` of the pool's address space."""

    offset: int
    nbytes: int


def check_dir_writable(path: str) -> None:
    """Raise ``ValueError`` unless ``path`` is a folder a page file can be written in
    (checked by writing a temporary file; :class:`loracore.optim.PagedAdamW` checks its
    ``offload_dir`` before it allocates anything)."""
    if not os.path.isdir(path):
        raise ValueError(f"PagedAdamW: offload_dir {path!r} is not a directory; create it or "
                         "pass offload_dir=None for a temporary one")
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".loracore-write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"PagedAdamW: offload_dir {path!r} is not writable ({exc}); pass a "
                         "folder you can write to, or offload_dir=None") from None


def _remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class PagePool:
    """Pages of ``page_bytes`` bytes, at most ``capacity`` of them resident on ``device``.

    Args:
        page_bytes: size of one page, a positive multiple of :data:`ALIGN`.
        capacity: resident pages allowed at once; None for no limit (nothing is ever evicted).
        device: where resident pages live (the parameters' device).
        offload_dir: folder for the page file when ``device`` is the CPU (a temporary folder
            when None). A fresh sub-folder is made in it and removed again by :meth:`close`.
    """

    def __init__(self, page_bytes: int, capacity: int | None, device: torch.device,
                 offload_dir: str | None = None) -> None:
        if page_bytes <= 0 or page_bytes % ALIGN:
            raise ValueError(f"PagePool: page_bytes must be a positive multiple of {ALIGN}, "
                             f"got {page_bytes}")
        if capacity is not None and capacity < 1:
            raise ValueError(f"PagePool: capacity must be at least one page, got {capacity}")
        if offload_dir is not None:
            check_dir_writable(offload_dir)
        self.page_bytes = page_bytes
        self.capacity = capacity
        self.device = torch.device(device)
        self.offload_dir = offload_dir
        self.num_pages = 0            # pages of address space laid out so far
        self._cursor = 0              # next free byte of address space
        self._fast = torch.zeros(0, dtype=torch.uint8, device=self.device)  # slots, flat
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # page -> slot, least recent first
        self._free: list[int] = []    # free slots (a heap: the lowest is reused first)
        self._on_slow: set[int] = set()  # pages whose bytes are in the slow tier
        self._slow: torch.Tensor | None = None  # (num_pages * page_bytes,) uint8
        self._dir: str | None = None
        self._file: str | None = None
        self._finalizer: weakref.finalize | None = None
        self.closed = False
        self.page_ins = self.page_outs = self.bytes_in = self.bytes_out = 0
        self.prefetched_pages = 0
        self.peak_resident_pages = 0
        self.epoch = 0  # changes whenever a page changes slot: views handed out are stale

    # ---- layout ---------------------------------------------------------------------------
    def allocate(self, nbytes: int) -> Segment:
        """Lay out ``nbytes`` of new (zero) state; returns its segment. Costs no memory yet."""
        offset = -(-self._cursor // ALIGN) * ALIGN
        self._cursor = offset + nbytes
        self.num_pages = -(-self._cursor // self.page_bytes)
        return Segment(offset, nbytes)

    def pages(self, seg: Segment, lo: int = 0, hi: int | None = None) -> range:
        """Pages holding bytes ``[lo, hi)`` of ``seg`` (default: all of it)."""
        hi = seg.nbytes if hi is None else hi
        if hi <= lo:
            return range(0)
        start, end = seg.offset + lo, seg.offset + hi
        return range(start // self.page_bytes, (end - 1) // self.page_bytes + 1)

    def page_breaks(self, seg: Segment) -> list[int]:
        """Byte offsets inside ``seg`` where a new page starts."""
        first = seg.offset // self.page_bytes + 1
        return [p * self.page_bytes - seg.offset for p in range(first, self.pages(seg)[-1] + 1)
                ] if seg.nbytes else []

    def slot_breaks(self, seg: Segment) -> list[int]:
        """Byte offsets inside a resident ``seg`` where its pages stop being in consecutive
        slots (the places a single view of it must be cut)."""
        pages = self.pages(seg)
        return [p * self.page_bytes - seg.offset for p in pages[1:]
                if self._slot_of[p] != self._slot_of[p - 1] + 1]

    # ---- the two tiers --------------------------------------------------------------------
    def _grow_fast(self, slots: int) -> None:
        grown = torch.zeros(slots * self.page_bytes, dtype=torch.uint8, device=self.device)
        grown[: self._fast.numel()] = self._fast
        old = self._fast.numel() // self.page_bytes
        self._fast = grown
        self.epoch += 1
        for s in range(old, slots):
            heapq.heappush(self._free, s)

    def _slow_tier(self) -> torch.Tensor:
        """The slow tier, sized for every page laid out (made on first use, grown as needed)."""
        size = self.num_pages * self.page_bytes
        if self._slow is not None and self._slow.numel() >= size:
            return self._slow
        if self.device.type == "cuda":
            # Pinned (page-locked) host memory: the GPU copies to and from it by DMA, without
            # blocking the host; that is the CPU RAM unified memory falls back to.
            slow = torch.zeros(size, dtype=torch.uint8, pin_memory=True)
        else:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="loracore-pages-", dir=self.offload_dir)
                self._file = os.path.join(self._dir, "pages.bin")
                # Removed when the pool is closed or garbage-collected, whichever comes first.
                self._finalizer = weakref.finalize(self, _remove, self._dir)
            with open(self._file, "ab") as f:  # extend the file; the new bytes read as zeros
                f.truncate(size)
            slow = torch.from_file(self._file, shared=True, size=size, dtype=torch.uint8)
        if self._slow is not None and self.device.type == "cuda":
            slow[: self._slow.numel()] = self._slow
        self._slow = slow
        return slow

    def _page(self, buf: torch.Tensor, index: int) -> torch.Tensor:
        return buf[index * self.page_bytes:(index + 1) * self.page_bytes]

    def _evict_one(self, keep: set[int]) -> int:
        for page in self._slot_of:  # least recently used first
            if page not in keep:
                slot = self._slot_of.pop(page)
                self.epoch += 1
                self._page(self._slow_tier(), page).copy_(self._page(self._fast, slot),
                                                          non_blocking=True)
                self._on_slow.add(page)
                self.page_outs += 1
                self.bytes_out += self.page_bytes
                return slot
        raise RuntimeError(f"PagePool: all {self.capacity} resident pages are needed at once; "
                           "give the optimizer a larger resident_bytes")

    def ensure(self, pages: list[int] | range, keep: set[int] = frozenset(),
               prefetch: bool = False) -> None:
        """Make ``pages`` resident (most recently used), evicting others but never ``keep``."""
        if self.closed:
            raise RuntimeError("PagePool: the pool is closed")
        needed = None  # built at the first eviction only: most calls find their pages resident
        for page in pages:
            if page in self._slot_of:
                self._slot_of.move_to_end(page)
                continue
            if self.capacity is not None and len(self._slot_of) >= self.capacity:
                needed = set(pages) | set(keep) if needed is None else needed
                slot = self._evict_one(needed)
            else:
                if not self._free:  # lay out every slot we may use at once: consecutive pages
                    # then land in consecutive slots, and a whole state is one view
                    limit = self.num_pages if self.capacity is None else self.capacity
                    self._grow_fast(max(len(self._slot_of) + 1, min(self.num_pages, limit)))
                slot = heapq.heappop(self._free)
            dst = self._page(self._fast, slot)
            if page in self._on_slow:
                dst.copy_(self._page(self._slow, page), non_blocking=True)
                self._on_slow.discard(page)
                self.page_ins += 1
                self.bytes_in += self.page_bytes
                self.prefetched_pages += prefetch
            else:
                dst.zero_()  # a page never written: its state starts at zero
            self._slot_of[page] = slot
            self.epoch += 1
        self.peak_resident_pages = max(self.peak_resident_pages, len(self._slot_of))

    def set_capacity(self, capacity: int | None) -> None:
        """Set a new page capacity (None: no limit), evicting least recently used pages
        down to it now."""
        if capacity is not None and capacity < 1:
            raise ValueError(f"PagePool: capacity must be at least one page, got {capacity}")
        while capacity is not None and len(self._slot_of) > capacity:
            heapq.heappush(self._free, self._evict_one(set()))
        self.capacity = capacity

    # ---- views and whole-segment copies ---------------------------------------------------
    def view(self, seg: Segment, lo: int, hi: int) -> torch.Tensor:
        """Bytes ``[lo, hi)`` of a resident ``seg`` as one uint8 view into the fast tier.

        The pages must be resident in consecutive slots (see :meth:`slot_breaks`)."""
        start = seg.offset + lo
        page = start // self.page_bytes
        base = self._slot_of[page] * self.page_bytes + start - page * self.page_bytes
        return self._fast[base: base + hi - lo]

    def read(self, seg: Segment) -> torch.Tensor:
        """A CPU copy of ``seg``'s bytes, wherever its pages are; residency is not changed."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # pending page-outs must land first
        out = torch.zeros(seg.nbytes, dtype=torch.uint8)
        for page in self.pages(seg):
            lo = max(seg.offset, page * self.page_bytes)
            hi = min(seg.offset + seg.nbytes, (page + 1) * self.page_bytes)
            if page in self._slot_of:
                src = self._page(self._fast, self._slot_of[page])
            elif page in self._on_slow:
                src = self._page(self._slow, page)
            else:
                continue  # never written: zeros
            within = lo - page * self.page_bytes
            out[lo - seg.offset: hi - seg.offset] = src[within: within + hi - lo].cpu()
        return out

    def write(self, seg: Segment, data: torch.Tensor) -> None:
        """Store ``data`` ((seg.nbytes,) uint8) as ``seg``'s bytes, paging in as needed."""
        for page in self.pages(seg):
            self.ensure([page])
            lo = max(seg.offset, page * self.page_bytes)
            hi = min(seg.offset + seg.nbytes, (page + 1) * self.page_bytes)
            self.view(seg, lo - seg.offset, hi - seg.offset).copy_(
                data[lo - seg.offset: hi - seg.offset])

    # ---- bookkeeping ----------------------------------------------------------------------
    @property
    def file(self) -> str | None:
        """The page file (CPU parameters, once a page has been written out), else None."""
        return self._file if self._dir is not None and not self.closed else None

    def stats(self) -> dict:
        """Counters (see ``PagedAdamW.paging_stats``); ``state_bytes`` is the state laid out,
        ``pages`` how many pages it spans."""
        return {"page_ins": self.page_ins, "page_outs": self.page_outs,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "resident_bytes": len(self._slot_of) * self.page_bytes,
                "peak_resident_bytes": self.peak_resident_pages * self.page_bytes,
                "prefetched_pages": self.prefetched_pages, "page_bytes": self.page_bytes,
                "state_bytes": self._cursor, "pages": self.num_pages,
                "budget_bytes": None if self.capacity is None else self.capacity * self.page_bytes,
                "offload_file": self.file}

    def reset_peak(self) -> None:
        """Start measuring the peak again from what is resident now."""
        self.peak_resident_pages = len(self._slot_of)

    def close(self) -> None:
        """Drop both tiers and remove the page file and its folder. Safe to call twice."""
        self._slow = None
        self._fast = torch.zeros(0, dtype=torch.uint8, device=self.device)
        self._slot_of.clear()
        self._on_slow.clear()
        self._free = []
        self.epoch += 1
        if self._finalizer is not None:
            self._finalizer()  # removes the folder now, once
        self.closed = True
