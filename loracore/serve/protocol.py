"""The bodies the HTTP server (:mod:`loracore.serve.server`) accepts, as pydantic models, and
the rules a body must meet before it reaches the engine (a 400 otherwise): OpenAI's fields and
vLLM's ``ignore_eos``; sampling parameters that give a distribution (the rule of
:class:`~loracore.serve.sampling.SamplingParams`, said at the door); text that is valid Unicode.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

try:
    from pydantic import AfterValidator, BaseModel, Field, field_validator
except ImportError:
    from loracore.extras import require_extra
    require_extra("serve", "loracore.serve.protocol")  # names the extra when one is missing
    raise

from loracore.serve.sampling import MAX_TEMPERATURE, MIN_TEMPERATURE

__all__ = ["CompletionRequest", "ChatRequest", "ChatMessage", "LoadRequest", "UnloadRequest", "Text"]


def _unicode(text: str) -> str:
    """Refuse a lone surrogate (JSON's ``"\ud800"``): it is no Unicode text; the tokenizer and
    the response's UTF-8 would fail on it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone surrogate ({text[e.start]!r} at {e.start}), which is not "
                         f"valid Unicode text") from None
    return text


#: A string field that must be valid Unicode (no lone surrogates).
Text = Annotated[str, AfterValidator(_unicode)]


class _Sampling(BaseModel):
    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    ignore_eos: bool = False  # vLLM's extra sampling parameter

    @field_validator("temperature")
    @classmethod
    def _samples(cls, t: float) -> float:  # the engine's rule (SamplingParams.check), said early
        if t != 0.0 and t < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}: "
                             f"a smaller one gives no probability distribution")
        return t


class CompletionRequest(_Sampling):
    prompt: Text | list[int]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class LoadRequest(BaseModel):
    lora_name: Text = Field(min_length=1)
    lora_path: Text = Field(min_length=1)


class UnloadRequest(BaseModel):
    lora_name: Text = Field(min_length=1)
