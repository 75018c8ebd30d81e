"""Generation with continuous batching, many adapters in one batch.

Each request is *prefilled* alone (its prompt in one forward pass) and then joins the running
batch: every step feeds the last token of every running request at once, each row with its
own adapter (:mod:`loracore.serve.batched`), its own key/value cache and its own random
generator. A request leaves the batch when it hits EOS or ``max_tokens``; a new one joins at
the next step.

A request's tokens never depend on its batch-mates, exactly (not only up to rounding): the
forward pass (:mod:`loracore.serve.decoder`) gives every request its own key/value cache and
fixed-shape row-wise products, and sampling (:mod:`loracore.serve.sampling`) uses a
``torch.Generator`` per request, seeded from the request's ``seed``.

A request's error stays its own: a failure while admitting it, in its prefill or while sampling
its tokens finishes that request alone (its :meth:`Request.result` raises it) and its batch-mates
go on unchanged; only a failure of the shared decode forward pass fails every request in it.

This module is the scheduler: which requests wait, which run, when each joins and leaves.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from loracore.serve.decoder import CHUNK, Decoder, KVCache
from loracore.serve.registry import AdapterInfo, AdapterRegistry, NoFreeSlot
from loracore.serve.sampling import MAX_TEMPERATURE, MIN_TEMPERATURE, SamplingParams, sample_token

__all__ = ["Engine", "Request", "SamplingParams", "PromptTooLong", "sample_token", "CHUNK",
           "MIN_TEMPERATURE", "MAX_TEMPERATURE"]


class PromptTooLong(ValueError):
    """The prompt plus ``max_tokens`` does not fit the model's context."""


_ids = itertools.count()


@dataclass
class Request:
    """One generation request; :meth:`result` waits for it, :meth:`stream` yields its tokens."""
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None
    arrival: float = field(default_factory=time.perf_counter)
    adapter_info: AdapterInfo | None = field(default=None, repr=False)
    _events: "queue.Queue[int | None]" = field(default_factory=queue.Queue, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request is finished (True) or ``timeout`` seconds pass (False)."""
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> list[int]:
        """The generated token ids (without the EOS token); raises the request's error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return list(self.output_ids)

    def stream(self, timeout: float | None = None) -> Iterator[int]:
        """Token ids as they are generated; raises the request's error at the end."""
        while True:
            tok = self._events.get(timeout=timeout)
            if tok is None:
                break
            yield tok
        if self.error is not None:
            raise self.error

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating for this request at the next step (a client that went away)."""
        self._cancelled = True


class _Row:
    """A running request: its key/value cache, its adapter, its random generator."""

    def __init__(self, req: Request, info, eos: set[int]) -> None:
        self.req, self.info, self.eos = req, info, eos
        self.cache = KVCache()
        self.pending: int | None = None  # sampled, not yet in the cache
        # no seed: a fresh one from the OS (torch.seed() would reseed the global generator)
        seed = req.params.seed if req.params.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.gen = torch.Generator().manual_seed(int(seed) % (2 ** 63))

    @property
    def slot(self) -> int:
        return -1 if self.info is None else self.info.slot

    @property
    def length(self) -> int:
        return self.cache.length


class Engine:
    """A background thread that runs every submitted request to completion, in batches.

    Args:
        model, tokenizer: the base model (Llama/Qwen2 family) and its tokenizer.
        registry: the adapters (:class:`AdapterRegistry` over the same model).
        max_num_seqs: at most this many requests run at once (vLLM's ``--max-num-seqs``).
    """

    def __init__(self, model: nn.Module, tokenizer, registry: AdapterRegistry, *,
                 max_num_seqs: int = 32) -> None:
        self.decoder = Decoder(model)  # refuses a model it cannot run (TypeError)
        self.model, self.tokenizer, self.registry = model.eval(), tokenizer, registry
        self.max_num_seqs = max_num_seqs
        self.max_model_len = self.decoder.max_model_len
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if tokenizer.eos_token_id is not None:
            self.eos.add(tokenizer.eos_token_id)
        self._waiting: list[Request] = []
        self._running: list[_Row] = []
        self._cond = threading.Condition()
        self._stop = False
        self.steps = 0
        self.batch_sizes: list[int] = []  # decode batch size at each step (for the lesson)
        self._thread = threading.Thread(target=self._loop, name="loracore-engine", daemon=True)
        self._thread.start()

    # ---- requests -------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], adapter: str | None = None,
               params: SamplingParams | None = None) -> Request:
        """Queue a request. Raises ``ValueError`` for bad parameters, :class:`PromptTooLong`,
        :class:`~loracore.serve.registry.UnknownAdapter` for an adapter name that is not loaded."""
        params = params or SamplingParams()
        params.check()
        if not prompt_ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLong(f"this model's maximum context length is {self.max_model_len} tokens; "
                                f"the prompt has {len(prompt_ids)} and max_tokens asks for "
                                f"{params.max_tokens} more. Shorten the prompt or lower max_tokens")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        req = Request(list(prompt_ids), adapter, params)
        if adapter is not None:  # resolved now: an unload after this point lets it finish
            req.adapter_info = self.registry.info(adapter)
        with self._cond:
            if self._stop:
                raise RuntimeError("Engine: stopped")
            self._waiting.append(req)
            self._cond.notify()
        return req

    def generate(self, prompt_ids: list[int], adapter: str | None = None,
                 params: SamplingParams | None = None, timeout: float | None = 300) -> list[int]:
        """Submit and wait: the generated ids."""
        return self.submit(prompt_ids, adapter, params).result(timeout)

    def close(self) -> None:
        """Stop the loop; requests still queued or running fail with RuntimeError."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # ---- the loop -------------------------------------------------------------------------
    # A request's error stays that request's: everything done for one request (admitting it,
    # its prefill, which is its own forward pass, sampling, the stop checks) fails that request
    # alone, and its batch-mates go on with exactly the tokens they would get alone (their
    # caches and generators are their own). Only the shared decode forward pass, which no one
    # request owns, fails every request in it.
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stop:
                    for req in self._waiting + [r.req for r in self._running]:
                        self._finish_req(req, None, RuntimeError("Engine: stopped"))
                    return
                new = self._admit()
            try:
                with torch.no_grad(), self.registry.lock:
                    if self._running:
                        self._decode_step()
                    for row in new:
                        self._isolated(row, self._prefill, row)
            except Exception as e:  # noqa: BLE001 - a bug above: fail these requests, keep the loop
                for row in self._running + new:
                    self._finish(row, None, e)
                new = []
            self._running = [r for r in self._running + new if not r.req.done]

    def _isolated(self, row: _Row, fn, *args) -> None:
        """``fn(*args)`` for one request; an exception finishes that request with it, alone."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - reported to the request's client
            self._finish(row, None, e)

    def _admit(self) -> list[_Row]:
        """Take waiting requests (oldest first) while there is room and an adapter slot."""
        new: list[_Row] = []
        keep: list[Request] = []
        for req in self._waiting:
            if getattr(req, "_cancelled", False):  # its client left before it started
                self._finish_req(req, "abort")
                continue
            if len(self._running) + len(new) >= self.max_num_seqs:
                keep.append(req)
                continue
            info = None
            try:
                if req.adapter is not None:
                    info = self.registry.acquire(req.adapter_info)
                new.append(_Row(req, info, self.eos))
            except NoFreeSlot:
                keep.append(req)  # every slot is pinned by running requests: wait
            except Exception as e:  # noqa: BLE001 - an unknown or broken adapter, or a bug: this request's
                if info is not None:  # acquired, then _Row failed: give the pin back
                    try:
                        self.registry.release(info)
                    except Exception:  # noqa: BLE001 - the request's error says more
                        pass
                self._finish_req(req, None, e)
        self._waiting = keep
        return new

    def _finish_req(self, req: Request, reason: str | None, error: BaseException | None = None) -> None:
        req.finish_reason, req.error = reason, error
        req._events.put(None)
        req._done.set()

    def _finish(self, row: _Row, reason: str | None, error: BaseException | None = None) -> None:
        if row.req.done:
            return
        try:
            if row.info is not None:
                self.registry.release(row.info)
        except Exception as e:  # noqa: BLE001 - a registry bug: this request's client hears of it
            reason, error = None, error or e
        self._finish_req(row.req, reason, error)

    def _emit(self, row: _Row, logits: torch.Tensor) -> None:
        p = row.req.params
        if getattr(row.req, "_cancelled", False):
            return self._finish(row, "abort")
        tok = sample_token(logits, float(p.temperature), float(p.top_p), row.gen)
        if tok in row.eos and not p.ignore_eos:
            return self._finish(row, "stop")
        row.req.output_ids.append(tok)
        row.req._events.put(tok)
        if len(row.req.output_ids) >= p.max_tokens or row.length + 1 >= self.max_model_len:
            return self._finish(row, "length")
        row.pending = tok

    # ---- the forward pass (loracore.serve.decoder) ----------------------------------------
    def _prefill(self, row: _Row) -> None:
        """Run one new request's prompt alone and sample its first token."""
        ids = torch.tensor(row.req.prompt_ids, device=self.decoder.device)
        logits = self.decoder.prefill(ids, row.cache, row.slot)
        self._emit(row, logits.cpu())  # sampled on the CPU, with the request's CPU generator

    def _decode_step(self) -> None:
        """Feed every running request's pending token; sample the next for each. A failure of
        the forward pass itself fails every request in it (the caller's handler): it belongs
        to no one request, and their caches may be half-written. Sampling fails one request."""
        rows = list(self._running)
        ids = torch.tensor([r.pending for r in rows], device=self.decoder.device)
        slots = torch.tensor([r.slot for r in rows], device=self.decoder.device)
        # one copy of the whole batch's logits to the CPU per step (none on a CPU), where each
        # request's own generator draws: a seed gives the same draw on every device
        logits = self.decoder.decode(ids, [r.cache for r in rows], slots).cpu()
        self.steps += 1
        self.batch_sizes.append(len(rows))
        for i, row in enumerate(rows):
            self._isolated(row, self._emit, row, logits[i])
        self._running = [r for r in self._running if not r.req.done]
