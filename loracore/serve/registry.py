"""The adapter registry: one frozen base model, many adapters swapped in and out at run time.

Adapters are named and read from disk (loracore's or PEFT's folders) with
:func:`loracore.adapter_file.read_adapter` and checked against the base with
:func:`loracore.adapters.check_base` (so the base-fingerprint check applies); the model is never
wrapped in LoRA layers. At most
``max_loras`` of them are *resident*: their factors sit in a slot of the per-layer stacks that
:mod:`loracore.serve.batched` multiplies with. When a request needs an adapter that is not
resident, the least recently used resident adapter that no running request holds (pinned) is
evicted, and the needed one is read from disk again. The base model's weights are never
written: each layer only gets a forward hook.
"""

from __future__ import annotations

import collections
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from loracore.adapter_file import AdapterFile, read_adapter
from loracore.adapters import check_base
from loracore.serve.batched import SlotStack, use_slots

__all__ = ["AdapterRegistry", "AdapterInfo", "AdapterError", "UnknownAdapter", "NoFreeSlot"]


class AdapterError(ValueError):
    """An adapter cannot be loaded (bad name, bad file, another base, rank too high ...)."""


class UnknownAdapter(KeyError):
    """No adapter of that name is registered."""


class NoFreeSlot(RuntimeError):
    """Every slot holds an adapter that a running request uses; wait for one to finish."""


@dataclass
class AdapterInfo:
    """What the registry knows about one adapter. ``r``, ``lora_alpha``, ``use_rslora``: as its
    file says (PEFT's config keys); ``rank_pattern`` / ``alpha_pattern``: the modules whose rank
    or alpha differ from those, by full name. ``nbytes``: its factors at their own rank;
    ``slot`` is ``None`` while it is not resident."""
    name: str
    path: str
    r: int
    lora_alpha: float
    modules: list[str]
    nbytes: int
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    slot: int | None = None
    pins: int = 0
    removed: bool = field(default=False, repr=False)
    key: str = field(default="", repr=False)  # unique per load, so a name can be reused at once


class AdapterRegistry:
    """Named adapters over one base model, at most ``max_loras`` resident at a time.

    Args:
        model: the base model (a transformers causal LM, or any module with linear layers).
        max_loras: slots, i.e. adapters held in memory at once (vLLM's ``--max-loras``).
        max_lora_rank: every slot is allocated at this rank; a higher-rank adapter is refused
            (vLLM's ``--max-lora-rank``).
        base_name: the name requests use for the base model; no adapter may take it.

    Every public method is thread-safe; :attr:`lock` also keeps a forward pass and a load
    from overlapping (the engine holds it for each step).
    """

    def __init__(self, model: nn.Module, *, max_loras: int = 8, max_lora_rank: int = 16,
                 base_name: str = "base") -> None:
        if not isinstance(max_loras, int) or max_loras < 1:
            raise ValueError(f"AdapterRegistry: max_loras must be a positive int, got {max_loras!r}")
        if not isinstance(max_lora_rank, int) or max_lora_rank < 1:
            raise ValueError(f"AdapterRegistry: max_lora_rank must be a positive int, got {max_lora_rank!r}")
        self.model = model
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.base_name = base_name
        self.lock = threading.RLock()
        self.stacks: dict[str, SlotStack] = {}           # module name -> its slot stack
        self._adapters: dict[str, AdapterInfo] = {}      # name -> info, for registered adapters
        self._entries: dict[str, AdapterInfo] = {}       # key -> info, also unloaded-but-running
        self._lru: collections.OrderedDict[str, None] = collections.OrderedDict()  # resident keys, oldest first
        self._slots: list[str | None] = [None] * max_loras  # slot -> key
        self._reads = 0
        self._fingerprints: dict[tuple[str, ...], dict] = {}
        param = next(model.parameters())
        self._dtype = param.dtype if param.is_floating_point() else torch.float32
        self._device = param.device

    # ---- reading a folder -----------------------------------------------------------------
    def _read(self, path: Path) -> AdapterFile:
        """Read and check an adapter folder (the model is not touched)."""
        self._reads += 1
        try:
            adapter = read_adapter(path, caller="AdapterRegistry")
            # the registry never writes the base weights: hash each set of layers once
            check_base(self.model, adapter, fingerprint_cache=self._fingerprints,
                       caller="AdapterRegistry")
        except (FileNotFoundError, ValueError) as e:
            raise AdapterError(str(e)) from None
        if adapter.use_dora:
            raise AdapterError(f"AdapterRegistry: {path} is a DoRA adapter (use_dora=true), which "
                               f"slot-based serving (like vLLM) cannot apply: merge it into the base "
                               f"instead (merge_adapters, then serve the merged model)")
        rank = max(m.r for m in adapter.modules.values())
        if rank > self.max_lora_rank:
            raise AdapterError(f"AdapterRegistry: {path} has rank {rank}, above max_lora_rank="
                               f"{self.max_lora_rank} (the rank every slot is allocated at); "
                               f"start the server with --max-lora-rank {rank} or more")
        return adapter

    # ---- slots ----------------------------------------------------------------------------
    def _place(self, info: AdapterInfo, adapter: AdapterFile) -> int:
        """Put ``adapter``'s factors into a free slot, evicting the least recently used unpinned adapter
        if none is free. Raises :class:`NoFreeSlot` when every slot is pinned."""
        if None in self._slots:
            slot, victim = self._slots.index(None), None
        else:
            victim = next((k for k in self._lru if self._entries[k].pins == 0), None)
            if victim is None:
                raise NoFreeSlot(f"AdapterRegistry: all {self.max_loras} slots hold adapters in use "
                                 f"by running requests; raise max_loras or wait")
            slot = self._entries[victim].slot
        factors = adapter.modules
        new = [n for n in factors if n not in self.stacks]
        try:
            for n in new:
                self.stacks[n] = SlotStack(self.model.get_submodule(n), self.max_loras,
                                           self.max_lora_rank, self._dtype, self._device)
            if victim is not None:
                self._evict(victim)
            for n, stack in self.stacks.items():
                if n in factors:
                    stack.put(slot, factors[n].lora_A, factors[n].lora_B, factors[n].scaling)
                else:
                    stack.clear(slot)
        except BaseException:
            for n in new:
                if n in self.stacks:
                    self.stacks.pop(n).remove()
            for stack in self.stacks.values():
                stack.clear(slot)
            raise
        self._slots[slot] = info.key
        info.slot = slot
        self._lru[info.key] = None
        return slot

    def _evict(self, key: str) -> None:
        info = self._entries[key]
        for stack in self.stacks.values():
            stack.clear(info.slot)
        self._slots[info.slot] = None
        info.slot = None
        self._lru.pop(key, None)
        if info.removed:
            del self._entries[key]

    # ---- public API -----------------------------------------------------------------------
    def load(self, name: str, path: str | os.PathLike) -> AdapterInfo:
        """Register adapter ``name`` from folder ``path`` and make it resident (evicting the
        least recently used unpinned adapter if needed; if every slot is pinned it is loaded
        on first use instead). Raises :class:`AdapterError` for a bad name, a name already
        loaded, a missing or malformed folder, an adapter for another base or a rank above
        ``max_lora_rank``; the registry is then exactly as before."""
        with self.lock:
            if not isinstance(name, str) or not name.strip():
                raise AdapterError(f"AdapterRegistry.load: adapter name must be a non-empty string, got {name!r}")
            if name == self.base_name:
                raise AdapterError(f"AdapterRegistry.load: {name!r} is the base model's name; pick another")
            if name in self._adapters:
                raise AdapterError(f"AdapterRegistry.load: an adapter named {name!r} is already loaded "
                                   f"(from {self._adapters[name].path}); unload it first or pick another name")
            folder = Path(path)
            if not folder.exists():
                raise AdapterError(f"AdapterRegistry.load: adapter path {str(folder)!r} does not exist")
            adapter = self._read(folder)
            nbytes = sum((m.lora_A.numel() + m.lora_B.numel()) * self._dtype.itemsize
                         for m in adapter.modules.values())
            info = AdapterInfo(name, str(folder), adapter.r, adapter.lora_alpha, sorted(adapter.modules),
                               nbytes, use_rslora=adapter.use_rslora, rank_pattern=adapter.rank_pattern,
                               alpha_pattern=adapter.alpha_pattern, key=f"{name}#{self._reads}")
            try:
                self._place(info, adapter)
            except NoFreeSlot:
                pass  # registered; read again when a request needs it
            self._adapters[name] = info
            self._entries[info.key] = info
            return info

    def unload(self, name: str) -> None:
        """Forget adapter ``name``. New requests can no longer use it; requests already
        running with it finish first, then its slot is freed."""
        with self.lock:
            info = self._adapters.pop(name, None)
            if info is None:
                raise UnknownAdapter(f"AdapterRegistry.unload: no adapter named {name!r} "
                                     f"(loaded: {sorted(self._adapters)})")
            info.removed = True
            if info.pins == 0:
                if info.slot is not None:
                    self._evict(info.key)
                self._entries.pop(info.key, None)

    def acquire(self, name: str | AdapterInfo) -> AdapterInfo:
        """Pin adapter ``name`` for a request and return its info (``.slot`` is where it sits;
        it is read from disk again if it was evicted). Raises :class:`UnknownAdapter` or
        :class:`NoFreeSlot`. Hand the info back to :meth:`release` when the request is done.
        ``name`` may be the :class:`AdapterInfo` itself (see :meth:`info`)."""
        with self.lock:
            # An info taken before an unload still works: a request accepted while the adapter
            # was loaded finishes with it.
            info = name if isinstance(name, AdapterInfo) else self._adapters.get(name)
            if info is None:
                raise UnknownAdapter(f"AdapterRegistry: no adapter named {name!r} "
                                     f"(loaded: {sorted(self._adapters)})")
            self._entries.setdefault(info.key, info)
            if info.slot is None:
                if None not in self._slots and all(self._entries[k].pins for k in self._lru):
                    raise NoFreeSlot(f"AdapterRegistry: all {self.max_loras} slots hold adapters "
                                     f"in use by running requests")
                self._place(info, self._read(Path(info.path)))
            info.pins += 1
            self._lru.move_to_end(info.key)
            return info

    def release(self, info: AdapterInfo) -> None:
        """Unpin an adapter that :meth:`acquire` returned (its request is done). An adapter
        unloaded meanwhile gives its slot back now."""
        with self.lock:
            if info.pins == 0:
                raise RuntimeError(f"AdapterRegistry.release: adapter {info.name!r} is not pinned")
            info.pins -= 1
            if info.removed and info.pins == 0:
                if info.slot is not None:
                    self._evict(info.key)
                self._entries.pop(info.key, None)

    def names(self) -> list[str]:
        """Registered adapters, in the order they were loaded."""
        with self.lock:
            return list(self._adapters)

    def info(self, name: str) -> AdapterInfo:
        with self.lock:
            if name not in self._adapters:
                raise UnknownAdapter(f"AdapterRegistry: no adapter named {name!r}")
            return self._adapters[name]

    def resident(self) -> list[str]:
        """Names of the adapters in slots, least recently used first."""
        with self.lock:
            return [self._entries[k].name for k in self._lru]

    def slot_bytes(self) -> int:
        """Bytes of all slot stacks (allocated at ``max_lora_rank`` for ``max_loras`` slots)."""
        with self.lock:
            return sum(s.nbytes() for s in self.stacks.values())

    def close(self) -> None:
        """Remove every hook; the model is the plain base model again."""
        with self.lock:
            for stack in self.stacks.values():
                stack.remove()
            self.stacks.clear()

    # ---- one mixed-adapter forward pass over a whole batch --------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, adapters: list[str | None], **kwargs) -> torch.Tensor:
        """Logits of one forward pass where row ``i`` uses adapter ``adapters[i]`` (``None``: the
        base model). input_ids: ``(batch, seq)``; other keyword arguments (``attention_mask``)
        go to the model. Returns ``(batch, seq, vocab)``."""
        if len(adapters) != input_ids.shape[0]:
            raise ValueError(f"AdapterRegistry.forward: {input_ids.shape[0]} rows but "
                             f"{len(adapters)} adapter names; give one per row (None for the base)")
        with self.lock:
            held = {}
            try:
                for name in dict.fromkeys(a for a in adapters if a is not None):
                    held[name] = self.acquire(name)
                slots = torch.tensor([-1 if a is None else held[a].slot for a in adapters],
                                     device=self._device)
                with use_slots(slots):
                    return self.model(input_ids=input_ids, **kwargs).logits
            finally:
                for info in held.values():
                    self.release(info)
