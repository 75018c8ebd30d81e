"""AdamW whose state lives in pages that move out of fast memory and back: ``PagedAdamW``.

AdamW keeps two tensors per parameter (``exp_avg``, the running mean of the gradient, and
``exp_avg_sq``, of its square): in float32 that is 8 bytes per trained parameter, twice the
parameters themselves. ``PagedAdamW`` computes exactly ``torch.optim.AdamW``'s update, but keeps
that state in the pages of a :class:`loracore.paging.PagePool`:

- ``resident_bytes``: how much state may sit in fast memory. Pages beyond it are evicted,
  least recently used first, to pinned CPU memory (parameters on CUDA) or to a memory-mapped
  file (parameters on the CPU), and paged back in before the update that needs them; the next
  parameter's pages are fetched ahead. ``paging_stats()`` counts every page that moved.
- ``state_bits=8``: both states stored in 8 bits, blockwise, as bitsandbytes' ``AdamW8bit``
  (:mod:`loracore.quant8`); tensors under 4096 elements keep float32 state, as there.

One update of a parameter ``p`` (gradient ``g``, step ``t``, all elementwise, float32)::

    p   <- p * (1 - lr * weight_decay)                  # decoupled weight decay
    m   <- beta1 * m + (1 - beta1) * g
    v   <- beta2 * v + (1 - beta2) * g * g
    p   <- p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

Because every operation is elementwise, a parameter can be updated piece by piece, one window
of pages at a time: that is what lets state larger than the budget be trained at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from loracore.paging import PagePool, Segment, check_dir_writable
from loracore.quant8 import BLOCKSIZE, dequantize_blockwise, dynamic_map, quantize_blockwise

#: Tensors with fewer elements keep float32 state under ``state_bits=8`` (bitsandbytes'
#: ``min_8bit_size``): their absmax constants would cost more than the bytes saved.
MIN_8BIT_SIZE = 4096
FORMAT = 1  # version of the state_dict layout ("paged_adamw" entry)


def adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                  exp_avg_sq: torch.Tensor, *, step: int, lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float, lerp: bool = True) -> None:
    """One AdamW update, in place. All tensors ``(n,)`` float32 (any equal shape); ``step``
    counts from 1.

    ``lerp=True`` moves the mean as ``torch.optim.AdamW`` does (one ``lerp_``: bit-identical to
    it); ``lerp=False`` as bitsandbytes' CPU update does (``mul_`` then ``add_``), which rounds
    differently in the last bit, enough to flip an 8-bit code now and then."""
    if weight_decay != 0:
        param.mul_(1.0 - lr * weight_decay)
    if lerp:
        exp_avg.lerp_(grad, 1.0 - beta1)
    else:
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2 ** step)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1.0 - beta1 ** step))


@dataclass
class _Layout:
    """Where one parameter's state lives: a segment per state tensor."""

    numel: int
    bits: int                       # 32, or 8 (then absmax segments too)
    segments: dict[str, Segment]
    pages: list[int]
    one_page_each: bool = False     # every segment lies inside one page: never cut in windows

    @property
    def blocks(self) -> int:
        return -(-self.numel // BLOCKSIZE)

    def dtype(self, name: str) -> torch.dtype:
        return torch.uint8 if self.bits == 8 and not name.endswith("absmax") else torch.float32

    def byte_range(self, name: str, a: int, b: int) -> tuple[int, int]:
        """Bytes of segment ``name`` that hold elements ``[a, b)``."""
        if name.endswith("absmax"):
            return 4 * (a // BLOCKSIZE), 4 * -(-b // BLOCKSIZE)
        size = 1 if self.bits == 8 else 4
        return size * a, size * b

    def element_at(self, name: str, byte: int) -> int:
        if name.endswith("absmax"):
            return byte // 4 * BLOCKSIZE
        return byte if self.bits == 8 else byte // 4


def _bad_params(params: list[torch.Tensor]) -> list[str]:
    problems = []
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            problems.append(f"item {i} is a {type(p).__name__}, not a tensor")
        elif not p.is_floating_point():
            problems.append(f"parameter {i} {tuple(p.shape)} has dtype {p.dtype}; AdamW needs "
                            "floating-point parameters")
        elif p.layout != torch.strided:
            problems.append(f"parameter {i} {tuple(p.shape)} is {p.layout}; only dense tensors")
    return problems


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with paged (and optionally 8-bit) state. ``torch.optim.AdamW``'s arguments, plus:

    Args:
        state_bits: 32 (float32 state, equal to ``torch.optim.AdamW``) or 8 (blockwise 8-bit,
            as bitsandbytes' ``AdamW8bit``).
        page_bytes: size of one page; a positive multiple of 256 bytes.
        resident_bytes: budget of state kept in fast memory; None keeps everything resident.
            It must hold at least one page of each state of a parameter (2 pages, or 4 with
            ``state_bits=8``). The peak never exceeds the budget.
        offload_dir: folder for the page file when the parameters are on the CPU (a temporary
            folder when None); the file and its folder are removed by :meth:`close` (or on
            garbage collection). Use the optimizer as a context manager to close it for sure.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, state_bits: int = 32, page_bytes: int = 1 << 20,
                 resident_bytes: int | None = None, offload_dir: str | None = None) -> None:
        if state_bits not in (8, 32):
            raise ValueError(f"PagedAdamW: state_bits must be 8 or 32, got {state_bits!r}")
        if not (lr >= 0 and eps >= 0 and weight_decay >= 0):
            raise ValueError(f"PagedAdamW: lr, eps and weight_decay must be >= 0, got lr={lr}, "
                             f"eps={eps}, weight_decay={weight_decay}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"PagedAdamW: betas must be two numbers in [0, 1), got {betas!r}")
        if not isinstance(page_bytes, int) or page_bytes <= 0 or page_bytes % 256:
            raise ValueError(f"PagedAdamW: page_bytes must be a positive multiple of 256, "
                             f"got {page_bytes!r}")
        self.state_bits = state_bits
        self.page_bytes = page_bytes
        self._capacity = self._pages_for_budget(resident_bytes)
        if offload_dir is not None:
            check_dir_writable(str(offload_dir))
        self._offload_dir = None if offload_dir is None else str(offload_dir)
        self._pool: PagePool | None = None
        self._layout: dict[torch.Tensor, _Layout] = {}
        self._codes: dict[str, torch.Tensor] = {}
        self._plans: dict[torch.Tensor, tuple[int, list]] = {}  # cached views, by parameter
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))

    def _pages_for_budget(self, resident_bytes: int | None) -> int | None:
        if resident_bytes is None:
            return None
        if resident_bytes < self.page_bytes:
            raise ValueError(f"PagedAdamW: resident_bytes={resident_bytes} is smaller than one "
                             f"page (page_bytes={self.page_bytes}); raise the budget or use "
                             "smaller pages")
        need = 4 if self.state_bits == 8 else 2
        if resident_bytes // self.page_bytes < need:
            raise ValueError(f"PagedAdamW: resident_bytes={resident_bytes} holds "
                             f"{resident_bytes // self.page_bytes} page(s) of {self.page_bytes} "
                             f"bytes; an update needs one page of each of its {need} state "
                             f"tensors at once: give at least {need * self.page_bytes} bytes")
        return resident_bytes // self.page_bytes

    # ---- parameters and their layout -------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated first), and lay out its parameters' state in the pool."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        problems = _bad_params(params)
        devices = {p.device for p in params if isinstance(p, torch.Tensor)}
        if self._pool is not None:
            devices.add(self._pool.device)
        if len(devices) > 1:
            problems.append(f"parameters on several devices {sorted(map(str, devices))}; one "
                            "PagedAdamW pages for one device")
        if problems:
            raise ValueError("PagedAdamW: " + "; ".join(problems))
        super().add_param_group({**param_group, "params": params})
        if self._pool is None and params:
            self._pool = PagePool(self.page_bytes, self._capacity, params[0].device,
                                  self._offload_dir)
        for p in params:
            self._layout[p] = self._lay_out(p.numel())

    def _lay_out(self, numel: int) -> _Layout:
        bits = 8 if self.state_bits == 8 and numel >= MIN_8BIT_SIZE else 32
        names = (["exp_avg", "exp_avg_sq"] if bits == 32 else
                 ["exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"])
        lay = _Layout(numel, bits, {}, [])
        for name in names:  # one parameter's states side by side: its pages are neighbours
            lay.segments[name] = self._pool.allocate(lay.byte_range(name, 0, numel)[1])
        lay.pages = sorted({pg for s in lay.segments.values() for pg in self._pool.pages(s)})
        lay.one_page_each = all(len(self._pool.pages(s)) == 1 for s in lay.segments.values())
        return lay

    # ---- the update ------------------------------------------------------------------------
    def _code(self, name: str) -> torch.Tensor:
        if name not in self._codes:  # signed code for the mean, unsigned for the square
            self._codes[name] = dynamic_map(signed=name == "exp_avg").to(self._pool.device)
        return self._codes[name]

    def _windows(self, lay: _Layout, resident: bool) -> list[tuple[int, int]]:
        """Element ranges of one parameter to update in one go: cut where any state's pages
        stop being consecutive in fast memory (all resident) or at every page (not)."""
        if lay.one_page_each:  # no page break inside any state: nothing to cut, whatever the
            return [(0, lay.numel)]  # slots (most LoRA tensors; the plan is rebuilt per move)
        cuts = {0, lay.numel}
        for name, seg in lay.segments.items():
            breaks = self._pool.slot_breaks(seg) if resident else self._pool.page_breaks(seg)
            cuts.update(lay.element_at(name, b) for b in breaks)
        cuts = sorted(cuts)
        return list(zip(cuts[:-1], cuts[1:]))

    def _views(self, lay: _Layout, a: int, b: int) -> dict[str, torch.Tensor]:
        return {n: self._pool.view(s, *lay.byte_range(n, a, b)).view(lay.dtype(n))
                for n, s in lay.segments.items()}

    def _update(self, p: torch.Tensor, group: dict[str, Any], lay: _Layout, step: int,
                resident: bool) -> None:
        pool = self._pool
        data = p.data if p.data.is_contiguous() else p.data.contiguous()
        flat_p, flat_g = data.view(-1), p.grad.reshape(-1)
        beta1, beta2 = group["betas"]
        hyper = dict(step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"])
        if resident:  # the whole state is in: views stay valid until a page moves (epoch)
            cached = self._plans.get(p)
            if cached is None or cached[0] != pool.epoch:
                cached = (pool.epoch, [(a, b, self._views(lay, a, b))
                                       for a, b in self._windows(lay, True)])
                self._plans[p] = cached
            plan = cached[1]
        else:
            plan = self._windows(lay, False)
        for item in plan:
            if resident:
                a, b, views = item
            else:  # bring in this window's pages only
                a, b = item
                pages = [pg for n, s in lay.segments.items()
                         for pg in pool.pages(s, *lay.byte_range(n, a, b))]
                pool.ensure(pages, keep=set(pages))
                views = self._views(lay, a, b)
            whole = a == 0 and b == lay.numel  # skip the slicing in the common case
            target = flat_p if whole else flat_p[a:b]
            target = target if data.dtype == torch.float32 else target.float()
            grad = (flat_g if whole else flat_g[a:b]).float()
            if lay.bits == 32:
                adamw_update_(target, grad, views["exp_avg"], views["exp_avg_sq"], **hyper)
            else:
                states = {n: dequantize_blockwise(views[n], views[n + "_absmax"], self._code(n))
                          for n in ("exp_avg", "exp_avg_sq")}
                adamw_update_(target, grad, states["exp_avg"], states["exp_avg_sq"], **hyper,
                              lerp=False)
                for n, value in states.items():
                    quantize_blockwise(value, self._code(n), out=views[n],
                                       absmax_out=views[n + "_absmax"])
            if data.dtype != torch.float32:
                flat_p[a:b].copy_(target)
        if data is not p.data:
            p.data.copy_(data)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Update every parameter that has a gradient; returns ``closure()``'s loss if given.

        Every gradient is checked before anything changes (dense, floating point, shape)."""
        if self._pool is not None and self._pool.closed:
            raise RuntimeError("PagedAdamW.step: the optimizer was closed")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        problems = []
        for _, p in work:
            g = p.grad
            if g.layout == torch.strided and g.is_floating_point() and g.shape == p.shape:
                continue  # the common case, checked cheaply
            if g.is_sparse or g.layout != torch.strided:
                problems.append(f"parameter {tuple(p.shape)} has a sparse gradient")
            elif not p.grad.is_floating_point():
                problems.append(f"parameter {tuple(p.shape)} has a {p.grad.dtype} gradient")
            elif p.grad.shape != p.shape:
                problems.append(f"parameter {tuple(p.shape)} has a gradient of shape "
                                f"{tuple(p.grad.shape)}")
        if problems:
            raise ValueError("PagedAdamW.step: AdamW needs dense floating-point gradients: "
                             + "; ".join(problems) + ". Nothing was changed.")
        pool = self._pool
        for i, (group, p) in enumerate(work):
            lay = self._layout[p]
            resident = pool.capacity is None or len(lay.pages) <= pool.capacity
            if pool.capacity is None:  # nothing is ever evicted: pages only come in once
                plan = self._plans.get(p)
                if plan is None or plan[0] != pool.epoch:
                    pool.ensure(lay.pages)
            elif resident:
                pool.ensure(lay.pages)
                if i + 1 < len(work):  # fetch the next parameter's pages ahead (on CUDA the
                    # copies run while this update computes); only if both fit together
                    nxt = self._layout[work[i + 1][1]].pages
                    if len(set(lay.pages) | set(nxt)) <= pool.capacity:
                        pool.ensure(nxt, keep=set(lay.pages), prefetch=True)
            state = self.state[p]
            state["step"] = state.get("step", 0) + 1
            self._update(p, group, lay, state["step"], resident)
        return loss

    # ---- paging ----------------------------------------------------------------------------
    def paging_stats(self) -> dict[str, Any]:
        """Pages and bytes moved so far (``page_ins``, ``page_outs``, ``bytes_in``,
        ``bytes_out``), state in fast memory now and at its peak (``resident_bytes``,
        ``peak_resident_bytes``), and ``budget_bytes``, ``state_bytes``, ``page_bytes``,
        ``prefetched_pages``, ``offload_file``."""
        if self._pool is None:
            return {}
        return self._pool.stats()

    def reset_peak_resident(self) -> None:
        """Measure ``peak_resident_bytes`` again from now on."""
        if self._pool is not None:
            self._pool.reset_peak()

    def set_resident_bytes(self, resident_bytes: int | None) -> None:
        """Change the budget; state over the new budget is paged out at once (a memory
        spike is coming), and comes back on demand when the budget grows again."""
        capacity = self._pages_for_budget(resident_bytes)  # validates first
        self._capacity = capacity
        if self._pool is not None:
            self._pool.set_capacity(capacity)

    def close(self) -> None:
        """Free the state and remove the page file and its folder. Safe to call twice."""
        self._plans.clear()  # cached views would keep the fast memory alive
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> "PagedAdamW":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- checkpoints -----------------------------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        """Like ``torch.optim.AdamW.state_dict()``: ``state`` by parameter index (``step``,
        ``exp_avg``, ``exp_avg_sq`` shaped like the parameter; with 8-bit state uint8 and
        ``exp_avg_absmax`` / ``exp_avg_sq_absmax``), ``param_groups``, and ``paged_adamw``
        (format, state_bits, shapes). Pages that are out are read from the slow tier; nothing
        moves, so saving does not disturb the paging."""
        params = self._params()
        index = {p: i for i, p in enumerate(params)}
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [index[p] for p in g["params"]]} for g in self.param_groups]
        state = {}
        for p in params:
            step = self.state.get(p, {}).get("step", 0)
            if step == 0:
                continue
            lay = self._layout[p]
            entry: dict[str, torch.Tensor] = {"step": torch.tensor(float(step))}
            for name, seg in lay.segments.items():
                value = self._pool.read(seg).view(lay.dtype(name))
                entry[name] = value if name.endswith("absmax") else value.view(p.shape)
            state[index[p]] = entry
        return {"state": state, "param_groups": groups,
                "paged_adamw": {"format": FORMAT, "state_bits": self.state_bits,
                                "shapes": [list(p.shape) for p in params]}}

    def _load_problems(self, state_dict: dict[str, Any]) -> list[str]:
        meta = state_dict.get("paged_adamw") if isinstance(state_dict, dict) else None
        if not isinstance(meta, dict) or "param_groups" not in state_dict:
            return ["it is not a PagedAdamW state_dict (no 'paged_adamw' entry)"]
        if meta.get("format") != FORMAT:
            return [f"format {meta.get('format')!r}, this version reads format {FORMAT}"]
        if meta.get("state_bits") != self.state_bits:
            return [f"it holds {meta.get('state_bits')}-bit state, this optimizer has "
                    f"state_bits={self.state_bits}"]
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            return [f"it has {len(saved)} parameter group(s), this optimizer "
                    f"{len(self.param_groups)}"]
        problems, shapes = [], meta.get("shapes", [])
        for gi, (old, new) in enumerate(zip(saved, self.param_groups)):
            label = f"group {gi}" + (f" ({new['name']!r})" if "name" in new else "")
            if len(old["params"]) != len(new["params"]):
                problems.append(f"{label} has {len(old['params'])} parameters saved, "
                                f"{len(new['params'])} here")
                continue
            for j, (i, p) in enumerate(zip(old["params"], new["params"])):
                if i >= len(shapes) or list(shapes[i]) != list(p.shape):
                    have = shapes[i] if i < len(shapes) else "nothing"
                    problems.append(f"{label} parameter {j}: saved shape {have}, here "
                                    f"{list(p.shape)}")
                    continue
                lay, entry = self._layout[p], state_dict["state"].get(i)
                for name in lay.segments if entry is not None else ():
                    want = lay.byte_range(name, 0, lay.numel)[1] // (4 if lay.dtype(name) ==
                                                                     torch.float32 else 1)
                    got = entry.get(name)
                    if (not isinstance(got, torch.Tensor) or got.dtype != lay.dtype(name)
                            or got.numel() != want):
                        problems.append(f"{label} parameter {j}: state {name!r} is missing or "
                                        f"not {want} values of {lay.dtype(name)}")
        return problems

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of a PagedAdamW over the same parameters (same groups,
        shapes and ``state_bits``). Everything is checked before anything changes; a mismatch
        names each group and parameter that differs. The paging budget stays this one's."""
        problems = self._load_problems(state_dict)
        if problems:
            raise ValueError("PagedAdamW.load_state_dict: the saved state does not fit this "
                             "optimizer's parameters: " + "; ".join(problems[:10])
                             + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""))
        saved = state_dict["param_groups"]
        for old, new in zip(saved, self.param_groups):
            for key, value in old.items():
                if key != "params":
                    new[key] = value
            for i, p in zip(old["params"], new["params"]):
                lay, entry = self._layout[p], state_dict["state"].get(i)
                for name, seg in lay.segments.items():
                    data = (torch.zeros(seg.nbytes, dtype=torch.uint8) if entry is None else
                            entry[name].detach().reshape(-1).cpu().contiguous().view(torch.uint8))
                    self._pool.write(seg, data.to(self._pool.device))
                self.state[p] = {"step": 0 if entry is None else int(entry["step"])}
