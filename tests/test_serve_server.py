"""The HTTP server, as a real process on 127.0.0.1 and a free port: vLLM's endpoints, every
error, streaming, and the official ``openai`` client against it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from loracore.models import build_tiny_qwen2, load_base_model
from test_serve import greedy, make_adapter, with_adapter

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model, _ = load_base_model("tiny-qwen2", verbose=False)
    other, _ = build_tiny_qwen2(seed=7)
    return {"a": make_adapter(model, root / "a", seed=1),
            "b": make_adapter(model, root / "b", seed=2, r=4, targets=["q_proj", "v_proj"]),
            "c": make_adapter(model, root / "c", seed=3),
            "other": make_adapter(other, root / "other", seed=4),
            "root": root}


@contextlib.contextmanager
def running_server(args: list[str]):
    """``python -m loracore.serve ARGS --host 127.0.0.1 --port FREE`` as a real process, until
    /health answers; yields ``(url, proc)`` (its stdout is a pipe) and stops it afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "loracore.serve", *args, "--host", HOST, "--port", str(port)]
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 300  # generous: a shared CI machine can be slow
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read().decode()[-2000:]}")
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not answer /health within 300 s")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(adapters):
    with running_server(["--model", "tiny-qwen2", "--lora-modules", f"a={adapters['a']}",
                         f"b={adapters['b']}", "--max-loras", "2"]) as (url, _):
        yield url


def post(url, path, body, **kw):
    return requests.post(url + path, json=body, timeout=60, **kw)


def error_of(resp, status):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body["error"]) >= {"message", "type", "code"}
    return body["error"]["message"]


def test_models_lists_the_base_and_adapters_with_parent(server):
    data = requests.get(server + "/v1/models", timeout=10).json()["data"]
    ids = {m["id"]: m for m in data}
    assert list(ids) == ["tiny-qwen2", "a", "b"]
    assert ids["tiny-qwen2"]["parent"] is None and ids["a"]["parent"] == ids["b"]["parent"] == "tiny-qwen2"


def test_completion_text_and_usage(server):
    r = post(server, "/v1/completions", {"model": "a", "prompt": "Hello", "max_tokens": 5, "temperature": 0})
    body = r.json()
    assert r.status_code == 200, body
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}  # bytes
    assert body["choices"][0]["finish_reason"] == "length"
    base = post(server, "/v1/completions", {"model": "tiny-qwen2", "prompt": "Hello", "max_tokens": 5,
                                            "temperature": 0}).json()
    assert base["choices"][0]["text"] != body["choices"][0]["text"]  # the adapter is applied
    again = post(server, "/v1/completions", {"model": "a", "prompt": "Hello", "max_tokens": 5, "temperature": 0})
    assert again.json()["choices"][0]["text"] == body["choices"][0]["text"]


def test_seeded_sampling_repeats_and_concurrent_requests_match_sequential(server):
    bodies = [{"model": m, "prompt": f"p{i}", "max_tokens": 8, "temperature": 1.0, "top_p": 0.95, "seed": i}
              for i, m in enumerate(["a", "b", "tiny-qwen2"] * 4)]
    alone = [post(server, "/v1/completions", b).json()["choices"][0]["text"] for b in bodies]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda b: post(server, "/v1/completions", b).json()["choices"][0]["text"], bodies))
    assert together == alone


def test_streaming_sends_the_same_text_as_one_response(server):
    body = {"model": "b", "prompt": "Stream me", "max_tokens": 12, "temperature": 0.7, "seed": 3}
    whole = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    r = post(server, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}},
             stream=True)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def test_errors_are_openai_style_and_the_server_survives(server, adapters):
    assert "does not exist" in error_of(post(server, "/v1/completions", {"model": "nope", "prompt": "x"}), 404)
    error_of(post(server, "/v1/completions", {"prompt": "x"}), 400)                       # no model
    error_of(post(server, "/v1/completions", {"model": "a", "prompt": "x", "max_tokens": 0}), 400)
    error_of(post(server, "/v1/completions", {"model": "a", "prompt": "x", "temperature": -1}), 400)
    error_of(post(server, "/v1/completions", {"model": "a", "prompt": "x", "n": 2}), 400)
    error_of(post(server, "/v1/chat/completions", {"model": "a", "messages": []}), 400)
    error_of(post(server, "/v1/chat/completions", {"model": "a", "messages": [{"role": "x", "content": 1}]}), 400)
    r = requests.post(server + "/v1/completions", data=b"{not json", timeout=10,
                      headers={"content-type": "application/json"})
    error_of(r, 400)
    msg = error_of(post(server, "/v1/completions", {"model": "a", "prompt": "y" * 600, "max_tokens": 1}), 400)
    assert "maximum context length is 512" in msg
    msg = error_of(post(server, "/v1/completions", {"model": "a", "prompt": "y" * 500, "max_tokens": 100}), 400)
    assert "maximum context length" in msg
    error_of(post(server, "/v1/completions", {"model": "a", "prompt": [10**6], "max_tokens": 1}), 400)
    # loading: missing field, missing path, another base, a name already loaded, the base's name
    error_of(post(server, "/v1/load_lora_adapter", {"lora_name": "z"}), 400)
    assert "does not exist" in error_of(post(server, "/v1/load_lora_adapter",
                                             {"lora_name": "z", "lora_path": "/no/such/dir"}), 400)
    msg = error_of(post(server, "/v1/load_lora_adapter", {"lora_name": "z", "lora_path": str(adapters["other"])}), 400)
    assert "different base model" in msg and "base weights" in msg
    assert "already loaded" in error_of(post(server, "/v1/load_lora_adapter",
                                             {"lora_name": "a", "lora_path": str(adapters["c"])}), 400)
    error_of(post(server, "/v1/load_lora_adapter", {"lora_name": "tiny-qwen2", "lora_path": str(adapters["c"])}), 400)
    error_of(post(server, "/v1/unload_lora_adapter", {"lora_name": "never-loaded"}), 404)
    assert requests.get(server + "/health", timeout=10).status_code == 200
    assert [m["id"] for m in requests.get(server + "/v1/models", timeout=10).json()["data"]] == ["tiny-qwen2", "a", "b"]


def test_hot_load_and_unload(server, adapters):
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(adapters["c"])})
    assert r.status_code == 200, r.text
    assert "c" in [m["id"] for m in requests.get(server + "/v1/models", timeout=10).json()["data"]]
    # three adapters over two slots: each still answers as itself
    outs = {m: post(server, "/v1/completions", {"model": m, "prompt": "hot", "max_tokens": 6, "temperature": 0}).json()
            for m in ("a", "b", "c", "a")}
    assert all(o["usage"]["completion_tokens"] >= 1 for o in outs.values())
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "c"}).status_code == 200
    error_of(post(server, "/v1/completions", {"model": "c", "prompt": "x"}), 404)


def test_the_openai_client_works_unchanged(server, adapters):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert {m.id for m in client.models.list()} >= {"tiny-qwen2", "a", "b"}
    chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=6, temperature=0, seed=1)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, seed=1, stream=True)
        if c.choices)
    assert streamed == chat.choices[0].message.content
    comp = client.completions.create(model="b", prompt="Once", max_tokens=4, temperature=0)
    model, tok = load_base_model("tiny-qwen2", verbose=False)   # the reference: adapter b's greedy answer
    eos = {model.generation_config.eos_token_id, tok.eos_token_id} - {None}
    want = greedy(with_adapter(model, adapters["b"]), tok("Once", add_special_tokens=False)["input_ids"], 4, eos)
    assert comp.usage.prompt_tokens == 4 and comp.usage.completion_tokens == len(want) >= 1
    assert comp.choices[0].text == tok.decode(want, skip_special_tokens=True)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="a", prompt="x" * 600, max_tokens=2)
