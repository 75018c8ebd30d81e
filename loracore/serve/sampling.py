"""How a request turns logits into its next token: :class:`SamplingParams` (what a client may
ask for, and the rule that refuses what gives no probability distribution) and
:func:`sample_token` (greedy, temperature and nucleus sampling with the request's own generator).
The scheduler that calls it is :mod:`loracore.serve.engine`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "sample_token", "MIN_TEMPERATURE", "MAX_TEMPERATURE"]

#: The smallest temperature that samples; below it (0 excepted) parameters are refused. vLLM
#: samples from the same floor (below 1e-5 it switches to greedy silently); refusing tells the
#: client. Any temperature at or above it keeps ``logits / temperature`` finite in float64 for
#: every finite float32 logit (|logit| <= 3.4e38 -> <= 3.4e43), so softmax is a distribution.
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0


@dataclass
class SamplingParams:
    """How one request samples.

    - ``temperature``: exactly 0 means greedy (argmax); otherwise it must lie in
      [:data:`MIN_TEMPERATURE`, :data:`MAX_TEMPERATURE`] = [1e-5, 100]. A positive temperature
      below 1e-5 (such as the subnormal 5e-324) would turn logits into inf and NaN: refused.
    - ``top_p``: in (0, 1]; keeps the smallest set of tokens whose probability reaches it
      (the smallest positive value keeps the top token alone).
    - ``seed`` makes sampling repeatable (None: a fresh random seed).

    NaN and infinity are refused for both (in JSON, 1e309 arrives as infinity).
    """
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extra parameter: always generate max_tokens (benchmarks)

    def check(self) -> None:
        """Raise ``ValueError`` naming the first parameter that cannot produce a distribution."""
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        t, p = float(self.temperature), float(self.top_p)
        if t != 0.0 and not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:  # NaN fails every comparison
            raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, "
                             f"{MAX_TEMPERATURE:g}], got {self.temperature!r}")
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


def sample_token(logits: torch.Tensor, temperature: float, top_p: float,
                 generator: torch.Generator) -> int:
    """One token id from logits ``(vocab,)``: argmax when ``temperature == 0``, else a draw
    from ``softmax(logits / temperature)`` restricted to the top-``top_p`` nucleus.

    Logits of any float dtype (bfloat16 too) on any device: the draw is made in float64 where
    ``generator`` lives (the engine's are CPU generators), so a seed gives the same token on
    every device for the same logits. Raises ``ValueError`` when the parameters (or the logits)
    give no distribution."""
    if logits.device != generator.device:  # multinomial refuses a generator on another device
        logits = logits.to(generator.device)
    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()):  # multinomial's own message names no cause
        raise ValueError(f"sampling: temperature {temperature!r} and these logits give no "
                         f"probability distribution (inf or NaN after logits / temperature)")
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True, stable=True)
        before = torch.cumsum(sorted_p, 0) - sorted_p       # mass of the tokens ahead of each
        sorted_p[before >= top_p] = 0.0                     # keep until the mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))
