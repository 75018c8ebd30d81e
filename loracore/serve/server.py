"""An OpenAI-compatible HTTP server over :class:`~loracore.serve.engine.Engine`, with vLLM's
endpoints for adapters.

- ``GET /v1/models``: the base model and every adapter (adapters carry ``parent`` = the base);
- ``POST /v1/completions`` and ``POST /v1/chat/completions``: ``model`` is an adapter's name
  or the base's; ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stream`` (server-sent
  events, ending with ``data: [DONE]``); ``usage`` counts the tokens;
- ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}``, ``POST /v1/unload_lora_adapter
  {"lora_name"}``; ``GET /health``.

Errors are OpenAI-style bodies ``{"error": {"message", "type", "param", "code"}}``: 404 for an
unknown model or adapter, 400 for anything malformed or refused (a missing adapter path, an
adapter for another base, a name already loaded, a prompt longer than the context, sampling
parameters that give no distribution: ``temperature`` must be 0, greedy, or in [1e-5, 100];
``top_p`` in (0, 1]; neither NaN nor infinite, and JSON's 1e309 is infinite).

One request cannot fail another's: an error while a request runs (sampling, say) fails that
request alone, with a 500 that names it (or an error event in its stream), and its batch-mates
get exactly the tokens they would get alone. A client that hangs up, streamed or not, stops
its request's generation within about :data:`DISCONNECT_POLL_S`.

``python -m loracore.serve`` starts it (its flags, ``--device`` and ``--dtype`` among them, are
:mod:`loracore.serve.__main__`'s). The bodies and their rules are :mod:`loracore.serve.protocol`'s. Each route is a module-level
handler on :data:`router`; the state they share (the engine and the base's name) is a
:class:`ServerState` on ``app.state.serving``, set by :func:`create_app`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, AsyncIterator, Callable

try:
    from fastapi import APIRouter, Depends, FastAPI, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
except ImportError:
    from loracore.extras import require_extra
    require_extra("serve", "loracore.serve.server")  # names the extra when one is missing
    raise

from loracore.serve.engine import Engine, PromptTooLong, Request
from loracore.serve.protocol import (ChatRequest, CompletionRequest, LoadRequest, UnloadRequest,
                                     _Sampling)
from loracore.serve.registry import AdapterError, UnknownAdapter
from loracore.serve.sampling import SamplingParams

__all__ = ["create_app", "router", "ServerState"]


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str, param: str | None = None,
           code: str | None = None) -> JSONResponse:
    # a message may quote the client's text, which may hold what UTF-8 cannot (\ud800)
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                   "code": code or status}}, status_code=status)


@dataclass
class ServerState:
    """What every handler shares: the engine (with its registry and tokenizer) and the names."""
    engine: Engine
    base_name: str     # the base model's name in requests and in /v1/models
    created: int       # the models' ``created`` time (the server's start), Unix seconds


async def _state(request: HTTPRequest) -> ServerState:  # async: no thread hop per request
    return request.app.state.serving


State = Annotated[ServerState, Depends(_state)]

#: Every route of the server; :func:`create_app` includes it.
router = APIRouter()


def create_app(engine: Engine, base_name: str) -> FastAPI:
    """The FastAPI application serving ``engine``; requests name the base ``base_name``."""
    app = FastAPI(title="loracore.serve")
    app.state.serving = ServerState(engine, base_name, int(time.time()))
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)  # a body JSON cannot parse; no such route
    app.add_exception_handler(Exception, _crash)
    app.include_router(router)
    return app


# ---- errors ---------------------------------------------------------------------------------
async def _api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
    return _error(e.status, e.message, e.type, e.param, e.code)


async def _invalid(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{where or 'body'}: {err.get('msg')}")
    return _error(400, "invalid request: " + "; ".join(parts), "BadRequestError")


async def _http_error(_: HTTPRequest, e: HTTPException) -> Response:
    if e.status_code < 400:
        return Response(status_code=e.status_code, headers=e.headers)
    type_ = "NotFoundError" if e.status_code == 404 else "BadRequestError"
    response = _error(e.status_code, f"invalid request: {e.detail}", type_)
    response.headers.update(e.headers or {})  # 405's Allow
    return response


async def _crash(_: HTTPRequest, e: Exception) -> JSONResponse:  # never take the server down
    return _error(500, f"internal error: {type(e).__name__}: {e}", "InternalServerError")


# ---- models and adapters --------------------------------------------------------------------
@router.get("/health")
async def health() -> Response:
    return Response(status_code=200)


@router.get("/v1/models")
async def models(state: State) -> dict:
    base_name, created, registry = state.base_name, state.created, state.engine.registry
    data = [{"id": base_name, "object": "model", "created": created, "owned_by": "loracore",
             "root": base_name, "parent": None}]
    for name in registry.names():
        info = registry.info(name)
        data.append({"id": name, "object": "model", "created": created, "owned_by": "loracore",
                     "root": info.path, "parent": base_name})
    return {"object": "list", "data": data}


@router.post("/v1/load_lora_adapter")
async def load_lora(body: LoadRequest, state: State) -> PlainTextResponse:
    if body.lora_name == state.base_name:
        raise APIError(400, f"{body.lora_name!r} is the base model's name; pick another", param="lora_name")
    try:
        await run_in_threadpool(state.engine.registry.load, body.lora_name, body.lora_path)
    except AdapterError as e:
        raise APIError(400, str(e), param="lora_path") from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora(body: UnloadRequest, state: State) -> PlainTextResponse:
    try:
        await run_in_threadpool(state.engine.registry.unload, body.lora_name)
    except UnknownAdapter:
        raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.",
                       "NotFoundError", "lora_name", "model_not_found") from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


# ---- generation -----------------------------------------------------------------------------
@router.post("/v1/completions")
async def completions(body: CompletionRequest, state: State, http: HTTPRequest):
    if isinstance(body.prompt, str):
        prompt_ids = await _tokenize(state, body.prompt, "prompt")
    else:
        prompt_ids = list(body.prompt)
    req = _submit(state, body, prompt_ids, body.max_tokens)
    rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        def chunk(text, finish):
            return {"id": rid, "object": "text_completion", "created": now, "model": body.model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        return _streaming(state, req, chunk, body)
    await _wait(req, http)
    return {"id": rid, "object": "text_completion", "created": now, "model": body.model,
            "choices": [{"index": 0, "text": _decode(state, req.output_ids), "logprobs": None,
                         "finish_reason": req.finish_reason}],
            "usage": _usage(req)}


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, state: State, http: HTTPRequest):
    messages = [m.model_dump() for m in body.messages]
    template = state.engine.tokenizer.apply_chat_template
    try:  # in a worker thread, like the tokenizing: a long conversation takes a while
        text = await run_in_threadpool(template, messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template that refuses the messages
        raise APIError(400, f"the chat template refused these messages: {e}", param="messages") from None
    prompt_ids = await _tokenize(state, text, "messages")
    req = _submit(state, body, prompt_ids, body.max_completion_tokens or body.max_tokens)
    rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        first = [True]

        def chunk(text, finish):
            delta = {"content": text} if text or finish is None else {}
            if first[0]:
                delta, first[0] = {"role": "assistant", **delta}, False
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": body.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return _streaming(state, req, chunk, body)
    await _wait(req, http)
    message = {"role": "assistant", "content": _decode(state, req.output_ids)}
    return {"id": rid, "object": "chat.completion", "created": now, "model": body.model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": req.finish_reason}],
            "usage": _usage(req)}


async def _tokenize(state: ServerState, text: str, param: str) -> list[int]:
    """The token ids of ``text``, computed in a worker thread: megabytes of prompt take seconds,
    and in the event loop they would stall every other client."""
    tokenizer = state.engine.tokenizer
    try:
        return await run_in_threadpool(lambda: tokenizer(text, add_special_tokens=False)["input_ids"])
    except Exception as e:  # noqa: BLE001 - text the tokenizer cannot take is the client's problem
        raise APIError(400, f"the tokenizer refused this {param}: {type(e).__name__}: {e}", param=param) from None


def _submit(state: ServerState, body: _Sampling, prompt_ids: list[int], max_tokens: int | None) -> Request:
    """Queue the request on the engine, or raise the :class:`APIError` that says why not."""
    engine, base_name, registry = state.engine, state.base_name, state.engine.registry
    if body.n != 1:
        raise APIError(400, "only n = 1 is supported", param="n")
    if body.model == base_name:
        adapter = None
    elif body.model in registry.names():
        adapter = body.model
    else:
        raise APIError(404, f"The model `{body.model}` does not exist. Served: "
                            f"{[base_name] + registry.names()}", "NotFoundError", "model",
                       "model_not_found")
    if max_tokens is None:  # vLLM's default: whatever the context has room for
        max_tokens = max(1, engine.max_model_len - len(prompt_ids))
    params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                            top_p=body.top_p, seed=body.seed, ignore_eos=body.ignore_eos)
    try:
        return engine.submit(prompt_ids, adapter, params)
    except PromptTooLong as e:
        raise APIError(400, str(e), param="messages" if isinstance(body, ChatRequest) else "prompt",
                       code="context_length_exceeded") from None
    except UnknownAdapter as e:
        raise APIError(404, str(e), "NotFoundError", "model", "model_not_found") from None
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _usage(req: Request) -> dict:
    n_in, n_out = len(req.prompt_ids), len(req.output_ids)
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


def _decode(state: ServerState, ids: list[int]) -> str:
    return state.engine.tokenizer.decode(ids, skip_special_tokens=True)


#: How often a non-streamed request's wait looks whether its client is still there, seconds.
DISCONNECT_POLL_S = 0.1


async def _wait(req: Request, http: HTTPRequest) -> None:
    """Wait for ``req`` to finish; cancel it if the client hangs up meanwhile (a streamed request
    is cancelled by Starlette closing its generator; a non-streamed one has nothing to close).

    The wait runs in a worker thread ``DISCONNECT_POLL_S`` at a time, so a finished request is
    answered at once and a client that left is noticed within about that long."""
    while not await run_in_threadpool(req.wait, DISCONNECT_POLL_S):
        if await http.is_disconnected():
            req.cancel()
            raise APIError(499, "the client closed the connection", "ClientClosedRequest")
    if req.error is not None:
        raise APIError(500, f"generation failed: {type(req.error).__name__}: {req.error}",
                       "InternalServerError")


Chunk = Callable[[str, str | None], dict]  # (new text, finish reason) -> one event's body


def _streaming(state: ServerState, req: Request, chunk: Chunk, body: _Sampling) -> StreamingResponse:
    usage = bool((body.stream_options or {}).get("include_usage"))
    return StreamingResponse(_sse(state, req, chunk, usage), media_type="text/event-stream")


async def _sse(state: ServerState, req: Request, chunk: Chunk, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of new text, then the finish, usage, [DONE]."""
    sent, ids = "", []
    stream = req.stream()
    try:
        while True:
            tok = await run_in_threadpool(next, stream, None)
            if tok is None:
                break
            ids.append(tok)
            text = _decode(state, ids)
            if text.endswith("\ufffd"):   # half of a multi-byte character: wait for the rest
                continue
            if len(text) > len(sent):
                yield f"data: {json.dumps(chunk(text[len(sent):], None))}\n\n"
                sent = text
    except Exception as e:  # noqa: BLE001 - report in the stream, keep the server up
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'InternalServerError'}})}\n\n"
    finally:
        req.cancel()
    text = _decode(state, ids)
    last = chunk(text[len(sent):], req.finish_reason)
    yield f"data: {json.dumps(last)}\n\n"
    if include_usage:
        usage = chunk("", None)
        usage["choices"], usage["usage"] = [], _usage(req)
        yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"
