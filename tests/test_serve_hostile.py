"""The serving engine and server against hostile and careless clients (issue 28): parameters
that cannot make a distribution are refused, a request that fails while it runs fails alone
(its batch-mates get exactly the tokens they get alone), a client that hangs up stops its
generation, and a few other ways to try to take the server down.

The HTTP tests run a real uvicorn server on 127.0.0.1 and a free port, in this process, so
that they can look into its engine (what runs, how many tokens a request got)."""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from loracore.models import load_base_model
from loracore.serve import AdapterRegistry, Engine, SamplingParams
from loracore.serve import engine as engine_module
from test_serve import make_adapter, prompt

HOST = "127.0.0.1"
MIN_TEMPERATURE = getattr(engine_module, "MIN_TEMPERATURE", 1e-5)  # the documented floor


class Unchecked(SamplingParams):
    """Parameters that skip :meth:`SamplingParams.check`: what a bug upstream could let through."""

    def check(self) -> None:
        pass


# ---- the rule: what makes a distribution --------------------------------------------------------
@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-6, MIN_TEMPERATURE * 0.999, -1e-9,
                                         math.nan, math.inf, -math.inf, 100.0001])
def test_temperatures_that_cannot_make_a_distribution_are_refused(temperature):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=temperature).check()


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.0000001, math.nan, math.inf])
def test_top_p_outside_0_1_or_not_finite_is_refused(top_p):
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=top_p).check()


@pytest.mark.parametrize("temperature", [0.0, -0.0, MIN_TEMPERATURE, 0.5, 2.0, 100.0])
def test_the_boundaries_that_hold_are_accepted_and_sample(temperature):
    SamplingParams(temperature=temperature, top_p=5e-324).check()  # the smallest top_p: the top token
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([3.0e38, -3.0e38, 0.0, 1.0])  # the float32 extremes
    assert engine_module.sample_token(logits, temperature, 1.0, g) == 0


def test_sample_token_names_the_problem_instead_of_multinomial():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="temperature 5e-324"):
        engine_module.sample_token(torch.tensor([1.0, 2.0]), 5e-324, 1.0, g)


# ---- a request that fails while running fails alone ------------------------------------------
@pytest.fixture
def eng(tiny, tmp_path):
    model, tok = tiny
    reg = AdapterRegistry(model, max_loras=2, max_lora_rank=8)
    reg.load("a", make_adapter(model, tmp_path / "a", seed=1))
    reg.load("b", make_adapter(model, tmp_path / "b", seed=2, r=4, targets=["q_proj", "v_proj"]))
    e = Engine(model, tok, reg, max_num_seqs=8)
    yield e
    e.close()


def idle(eng, within: float = 10.0) -> None:
    """Wait (bounded) until the engine runs and queues nothing."""
    deadline = time.monotonic() + within
    while eng._running or eng._waiting:
        assert time.monotonic() < deadline, "requests still in the engine"
        time.sleep(0.05)


def jobs_for(eng):
    tok = eng.tokenizer
    return [(prompt(tok, f"job {i}"), [None, "a", "b"][i % 3],
             SamplingParams(max_tokens=10, temperature=[0.0, 1.0, 0.7][i % 3], top_p=0.9, seed=i,
                            ignore_eos=True))
            for i in range(5)]


def run_together(eng, jobs, poisoned):
    """Submit every job and the poisoned one while the engine is held, so that they share
    the batch from the first step; the jobs' requests and the poisoned one's."""
    with eng._cond:  # the engine's loop waits on this (an RLock): nothing is admitted until we let go
        reqs = [eng.submit(*job) for job in jobs[:2]]
        bad = eng.submit(*poisoned)
        reqs += [eng.submit(*job) for job in jobs[2:]]
    return reqs, bad


def test_a_subnormal_temperature_that_slips_past_check_fails_only_its_request(eng):
    jobs = jobs_for(eng)
    alone = [eng.generate(*job) for job in jobs]
    poisoned = (prompt(eng.tokenizer, "poison"), "a", Unchecked(max_tokens=10, temperature=5e-324))
    reqs, bad = run_together(eng, jobs, poisoned)
    assert [r.result(60) for r in reqs] == alone
    with pytest.raises(ValueError, match="temperature"):
        bad.result(60)
    idle(eng)
    assert all(eng.registry.info(n).pins == 0 for n in "ab")
    assert eng.generate(*jobs[0]) == alone[0]  # the engine goes on


def test_a_failure_mid_generation_fails_only_its_request(eng, monkeypatch):
    """The poisoned request samples fine for three tokens, then its sampling raises: the
    others, in the same decode step, carry on exactly as alone."""
    jobs = jobs_for(eng)
    alone = [eng.generate(*job) for job in jobs]
    real, calls = engine_module.sample_token, [0]

    def flaky(logits, temperature, top_p, generator):
        if top_p == 0.123:  # the poisoned request's marker
            calls[0] += 1
            if calls[0] == 4:
                raise RuntimeError("injected sampling failure")
        return real(logits, temperature, top_p, generator)
    monkeypatch.setattr(engine_module, "sample_token", flaky)
    poisoned = (prompt(eng.tokenizer, "poison"), "b", SamplingParams(max_tokens=10, temperature=1.0, top_p=0.123,
                                                                     ignore_eos=True))
    reqs, bad = run_together(eng, jobs, poisoned)
    assert [r.result(60) for r in reqs] == alone
    with pytest.raises(RuntimeError, match="injected sampling failure"):
        bad.result(60)
    assert len(bad.output_ids) == 3 and bad.finish_reason is None
    assert max(eng.batch_sizes) == len(jobs) + 1, "the poisoned request never shared a batch"


def test_a_failing_prefill_fails_only_its_request(eng, monkeypatch):
    """A prefill is one request's own forward pass: its failure is that request's."""
    jobs = jobs_for(eng)
    alone = [eng.generate(*job) for job in jobs]
    poison_ids = prompt(eng.tokenizer, "poison")
    real = eng.decoder.prefill

    def prefill(ids, cache, slot):
        if ids.tolist() == poison_ids:
            raise RuntimeError("injected prefill failure")
        return real(ids, cache, slot)
    monkeypatch.setattr(eng.decoder, "prefill", prefill)
    reqs, bad = run_together(eng, jobs, (poison_ids, "a", SamplingParams(max_tokens=10)))
    assert bad.wait(60) and bad.wait(0)  # finished, and stays so
    with pytest.raises(RuntimeError, match="injected prefill failure"):
        bad.result(0)
    assert [r.result(60) for r in reqs] == alone
    idle(eng)
    assert all(eng.registry.info(n).pins == 0 for n in "ab")


def test_an_unexpected_error_admitting_a_request_fails_it_alone(eng, monkeypatch):
    """Before, anything but the registry's own errors escaped the loop and killed the engine's
    thread: every request then waited forever."""
    jobs = jobs_for(eng)
    alone = [eng.generate(*job) for job in jobs]
    real = eng.registry.acquire

    def acquire(info):
        if getattr(info, "name", info) == "b":
            raise RuntimeError("injected acquire failure")
        return real(info)
    monkeypatch.setattr(eng.registry, "acquire", acquire)
    reqs = [eng.submit(*job) for job in jobs]
    for r, job, want in zip(reqs, jobs, alone):
        if job[1] == "b":
            with pytest.raises(RuntimeError, match="injected acquire failure"):
                r.result(10)
        else:
            assert r.result(10) == want
    monkeypatch.undo()
    assert eng.generate(*jobs[2], timeout=10) == alone[2]


def test_a_failing_release_fails_only_its_request_and_the_engine_goes_on(eng, monkeypatch):
    """Before, a release that raised finished no request and then escaped the loop's own
    handler: the engine's thread died and every request waited forever."""
    jobs = jobs_for(eng)
    alone = [eng.generate(*job) for job in jobs]
    real = eng.registry.release

    def release(info):
        real(info)
        if info.name == "b":
            raise RuntimeError("injected release failure")
    monkeypatch.setattr(eng.registry, "release", release)
    reqs = [eng.submit(*job) for job in jobs]
    for r, job, want in zip(reqs, jobs, alone):
        if job[1] == "b":
            with pytest.raises(RuntimeError, match="injected release failure"):
                r.result(10)
            assert r.output_ids == want  # it did generate; the error is its own
        else:
            assert r.result(10) == want
    monkeypatch.undo()
    assert eng.generate(*jobs[2], timeout=10) == alone[2]


# ---- the real server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A uvicorn server on 127.0.0.1 and a free port, in a thread of this process; its engine."""
    uvicorn = pytest.importorskip("uvicorn")
    from loracore.serve.server import create_app
    from test_serve_server import free_port

    root = tmp_path_factory.mktemp("adapters")
    model, tok = load_base_model("tiny-qwen2", verbose=False)
    reg = AdapterRegistry(model, max_loras=2, max_lora_rank=8, base_name="tiny-qwen2")
    reg.load("a", make_adapter(model, root / "a", seed=1))
    reg.load("b", make_adapter(model, root / "b", seed=2, r=4, targets=["q_proj", "v_proj"]))
    eng = Engine(model, tok, reg, max_num_seqs=8)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(eng, "tiny-qwen2"), host=HOST, port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://{HOST}:{port}", eng
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        eng.close()


def post(url, path, body, timeout=60, **kw):
    return requests.post(url + path, json=body, timeout=timeout, **kw)


def raw(url, path, data: bytes, timeout=60):
    return requests.post(url + path, data=data, timeout=timeout, headers={"content-type": "application/json"})


BODIES = [{"model": m, "prompt": f"client {i}", "max_tokens": 12, "temperature": t, "seed": i, "ignore_eos": True}
          for i, (m, t) in enumerate([("a", 0.0), ("b", 1.0), ("tiny-qwen2", 0.8), ("a", 0.5)])]


def texts(url, bodies):
    out = []
    for b in bodies:
        r = post(url, "/v1/completions", b)
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0]["text"])
    return out


def assert_alive(url, eng):
    assert requests.get(url + "/health", timeout=10).status_code == 200
    idle(eng)


@pytest.mark.parametrize("field, value", [
    ("temperature", "5e-324"), ("temperature", "1e-6"), ("temperature", "NaN"), ("temperature", "1e309"),
    ("temperature", "-1e309"), ("top_p", "NaN"), ("top_p", "1e309"), ("top_p", "5e-324"),
])
def test_http_parameters_that_cannot_make_a_distribution_get_400_and_others_200(served, field, value):
    url, eng = served
    alone = texts(url, BODIES)
    body = b'{"model": "a", "prompt": "attack", "max_tokens": 8, "%s": %s}' % (field.encode(), value.encode())
    with ThreadPoolExecutor(len(BODIES) + 1) as pool:
        bad = pool.submit(raw, url, "/v1/completions", body)
        together = list(pool.map(lambda b: post(url, "/v1/completions", b), BODIES))
    r = bad.result()
    if field == "top_p" and value == "5e-324":  # a tiny nucleus is still a distribution: the top token
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 400, r.text
        assert field in r.json()["error"]["message"]
    assert [t.status_code for t in together] == [200] * len(BODIES)
    assert [t.json()["choices"][0]["text"] for t in together] == alone
    assert_alive(url, eng)


def test_http_a_request_failing_mid_generation_fails_alone(served, monkeypatch):
    url, eng = served
    alone = texts(url, BODIES)
    real = engine_module.sample_token

    def flaky(logits, temperature, top_p, generator):
        if top_p == 0.123:
            raise RuntimeError("injected sampling failure")
        return real(logits, temperature, top_p, generator)
    monkeypatch.setattr(engine_module, "sample_token", flaky)
    poisoned = {"model": "b", "prompt": "poison", "max_tokens": 8, "temperature": 1.0, "top_p": 0.123}
    with ThreadPoolExecutor(len(BODIES) + 2) as pool:
        futures = [pool.submit(post, url, "/v1/completions", b) for b in BODIES[:2]]
        bad = pool.submit(post, url, "/v1/completions", poisoned)
        bad_stream = pool.submit(post, url, "/v1/completions", {**poisoned, "stream": True})
        futures += [pool.submit(post, url, "/v1/completions", b) for b in BODIES[2:]]
        together = [f.result() for f in futures]
    assert [t.status_code for t in together] == [200] * len(BODIES)
    assert [t.json()["choices"][0]["text"] for t in together] == alone
    r = bad.result()
    assert r.status_code == 500 and "injected sampling failure" in r.json()["error"]["message"], r.text
    assert "injected sampling failure" in bad_stream.result().text
    monkeypatch.undo()
    assert_alive(url, eng)


def test_a_client_that_hangs_up_on_a_non_streamed_request_stops_its_generation(served, monkeypatch):
    url, eng = served
    submitted = []
    real_submit, real_decode = eng.submit, eng.decoder.decode

    def submit(*args, **kw):
        submitted.append(real_submit(*args, **kw))
        return submitted[-1]

    def slow_decode(*args, **kw):  # 20 ms a step: 400 tokens would take 8 s
        time.sleep(0.02)
        return real_decode(*args, **kw)
    monkeypatch.setattr(eng, "submit", submit)
    monkeypatch.setattr(eng.decoder, "decode", slow_decode)
    params = {"model": "a", "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    cases = [("/v1/completions", {**params, "prompt": "go on"}),
             ("/v1/chat/completions", {**params, "messages": [{"role": "user", "content": "go on"}]}),
             ("/v1/completions", {**params, "prompt": "go on", "stream": True})]  # this one always worked
    for path, body in cases:
        if body.get("stream"):
            with post(url, path, body, stream=True) as r:
                next(r.iter_lines())  # a token came; then the client closes the connection
        else:
            with pytest.raises(requests.Timeout):
                post(url, path, body, timeout=0.5)  # requests closes the connection on a timeout
        req = submitted[-1]
        deadline = time.monotonic() + 4
        while not req.done:
            assert time.monotonic() < deadline, f"{path}: still generating for a client that left " \
                                                f"({len(req.output_ids)} tokens)"
            time.sleep(0.05)
        assert req.finish_reason == "abort" and len(req.output_ids) < 100, (path, len(req.output_ids))
    monkeypatch.undo()
    assert_alive(url, eng)


# ---- other ways to try to take the server down ---------------------------------------------------
@pytest.mark.parametrize("path, field, body", [
    ("/v1/completions", "prompt", b'{"model": "tiny-qwen2", "prompt": "ab\\ud800cd", "max_tokens": 2}'),
    ("/v1/chat/completions", "content", b'{"model": "tiny-qwen2", "max_tokens": 2,'
                                        b' "messages": [{"role": "user", "content": "ab\\udfffcd"}]}'),
    ("/v1/completions", "model", b'{"model": "a\\ud800", "prompt": "x", "max_tokens": 2}'),
    ("/v1/load_lora_adapter", "lora_name", b'{"lora_name": "\\ud800", "lora_path": "/nowhere"}'),
    ("/v1/unload_lora_adapter", "lora_name", b'{"lora_name": "\\ud800"}'),
])
def test_lone_surrogates_are_refused_with_400(served, path, field, body):
    """JSON can carry ``\\ud800``, which no UTF-8 text holds: before, the tokenizer raised (500)
    or the error itself could not be written (500, a traceback in the log)."""
    url, eng = served
    r = raw(url, path, body)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"], r.text  # the field that holds it is named
    assert requests.get(url + "/v1/models", timeout=10).status_code == 200
    assert_alive(url, eng)


@pytest.mark.parametrize("body", [b"{not json", b'{"model": "a", "seed": ' + b"9" * 5000 + b"}",
                                  b"[" * 100_000 + b"]" * 100_000, b'{"model": "\xff\xfe"}'])
def test_bodies_json_cannot_parse_get_an_openai_style_400(served, body):
    url, eng = served
    r = raw(url, "/v1/completions", body)
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) >= {"message", "type", "code"}, r.text
    assert_alive(url, eng)


def test_a_huge_prompt_does_not_stall_other_clients(served):
    """Tokenizing megabytes takes seconds: before, it ran in the server's event loop, and every
    other client (even ``/health``) waited for it."""
    url, eng = served
    big = {"model": "tiny-qwen2", "prompt": "word " * 600_000, "max_tokens": 1}
    with ThreadPoolExecutor(1) as pool:
        start = time.monotonic()
        future = pool.submit(post, url, "/v1/completions", big)
        latencies = []
        while not future.done() and len(latencies) < 200:
            t = time.monotonic()
            assert requests.get(url + "/health", timeout=30).status_code == 200
            latencies.append(time.monotonic() - t)
            time.sleep(0.05)
        r = future.result()
        took = time.monotonic() - start
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    if took < 3.0:
        pytest.skip(f"the tokenizer was too fast here ({took:.1f} s) to show a stall")
    # in the event loop, /health waited about as long as the big request took
    assert max(latencies) < max(1.0, took / 3), f"/health waited {max(latencies):.1f} s behind a " \
                                                f"big prompt that took {took:.1f} s"
