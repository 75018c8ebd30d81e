"""Where the server runs and in which dtype: ``python -m loracore.serve --device/--dtype`` (the
decision itself, :func:`loracore.models.resolve_device_dtype`, is tested in test_models.py), and
the serving stack in bfloat16 on the CPU, in process and as a real server.

The GPU side of the same checks is in test_cuda.py (skipped without CUDA); it uses
:func:`near_greedy_gaps` from here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from loracore import models
from loracore.models import load_base_model
from loracore.serve import AdapterRegistry, Engine, SamplingParams, sample_token
from loracore.serve.__main__ import main, parse_args
from loracore.serve.decoder import Decoder, KVCache
from test_models import fake_machine
from test_serve import greedy, make_adapter, prompt, with_adapter
from test_serve_server import free_port, post, running_server

PROMPTS = ["The capital of Vourremia is", "Hello", "Once upon a time", "p1", "xyz 123"]

#: How far (in float32 logits) a token the bfloat16 server picks may sit below the float32
#: model's best token at the same step, given the same prefix. bfloat16 keeps 8 significant
#: bits, so on the tiny model's logits (spread over about 1.0) the two dtypes disagree by up to
#: about 0.005 (measured on these prompts); near-ties then flip and the texts part ways. 0.05 is
#: ten times that and still a twentieth of the spread: a token from a wrong device, a dropped
#: adapter or garbage sits 0.3 or more below the best.
BF16_LOGIT_TOLERANCE = 0.05


def near_greedy_gaps(reference: torch.nn.Module, ids: list[int], tokens: list[int]) -> list[float]:
    """Teacher-forced check of a greedy answer: for each of ``tokens`` (generated after ``ids``),
    how far ``reference``'s logit for it lies below ``reference``'s best logit at that step,
    with the same prefix. All zero: ``tokens`` is ``reference``'s own greedy answer."""
    with torch.no_grad():
        logits = reference(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1].float()
    picked = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    return (logits.max(-1).values - picked).tolist()


@pytest.fixture(scope="module")
def adapter_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model, _ = load_base_model("tiny-qwen2", verbose=False)  # made on float32, served in bfloat16
    return {"a": make_adapter(model, root / "a", seed=1),
            "b": make_adapter(model, root / "b", seed=2, r=4, targets=["q_proj", "v_proj"])}


# ---- the command line ------------------------------------------------------------------------
def test_unknown_device_or_dtype_is_an_argparse_error(capsys):
    for argv, said in ([["--device", "tpu"], "argument --device: unknown device 'tpu'"],
                       [["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"]):
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert e.value.code == 2 and said in capsys.readouterr().err
    args = parse_args([])
    assert (args.device, args.dtype) == ("auto", "auto")
    assert parse_args(["--device", "CUDA:1", "--dtype", "bfloat16"]).device == "cuda:1"


def test_device_cuda_without_cuda_exits_2_in_one_line_before_loading(monkeypatch, capsys):
    fake_machine(monkeypatch, cuda=False, built_with_cuda=False)

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(models, "load_base_model", no_loading)
    assert main(["--model", "tiny-qwen2", "--device", "cuda"]) == 2
    out = capsys.readouterr()
    assert out.err == (f"loracore.serve: --device cuda: CUDA is not available on this machine "
                       f"(torch {torch.__version__} was built without CUDA); use --device cpu\n")
    assert out.out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda would serve")
def test_python_m_loracore_serve_device_cuda_without_cuda_exits_2():
    run = subprocess.run([sys.executable, "-m", "loracore.serve", "--model", "tiny-qwen2",
                          "--device", "cuda", "--port", str(free_port())],
                         env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("loracore.serve: --device cuda: CUDA is not available on this machine (")
    assert run.stderr.rstrip().endswith("); use --device cpu") and run.stderr.count("\n") == 1
    assert "base model" not in run.stdout  # load_base_model's line: nothing was loaded


def test_float16_on_the_cpu_is_warned_about_in_one_line(monkeypatch, capsys):
    class Loaded(Exception):
        pass

    def loading(name, *, dtype, device, **k):
        raise Loaded(dtype, device)
    monkeypatch.setattr(models, "load_base_model", loading)
    with pytest.raises(Loaded) as e:
        main(["--model", "tiny-qwen2", "--device", "cpu", "--dtype", "float16"])
    assert e.value.args == (torch.float16, torch.device("cpu"))  # served as asked
    err = capsys.readouterr().err
    assert err.startswith("loracore.serve: warning: --dtype float16 on the CPU: most CPUs have no float16")
    assert err.count("\n") == 1


# ---- bfloat16 on the CPU, in process ---------------------------------------------------------
def test_bf16_engine_greedy_equals_the_bf16_models_own_generate(adapter_paths):
    """Exact: the reference holds its adapter in bfloat16, as the registry's slots do (vLLM's
    choice too), so both compute the same products in the same order; the base alone is the
    model's own bfloat16 forward pass."""
    model, tok = load_base_model("tiny-qwen2", dtype=torch.bfloat16, verbose=False)
    reg = AdapterRegistry(model, max_loras=2)
    for name, path in adapter_paths.items():
        reg.load(name, path)
    assert {s.A.dtype for s in reg.stacks.values()} == {torch.bfloat16}
    eng = Engine(model, tok, reg)
    try:
        for text in PROMPTS:
            ids = prompt(tok, text)
            for name in (None, "a", "b"):
                ref = model if name is None else with_adapter(model, adapter_paths[name]).to(torch.bfloat16)
                want = greedy(ref, ids, 12, eng.eos)
                assert eng.generate(ids, name, SamplingParams(max_tokens=12)) == want, (text, name)
        seeded = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=5)
        assert eng.generate(ids, "a", seeded) == eng.generate(ids, "a", seeded)
    finally:
        eng.close()


def test_bf16_caches_are_bf16_and_logits_float32():
    model, tok = load_base_model("tiny-qwen2", dtype=torch.bfloat16, verbose=False)
    dec = Decoder(model)
    assert (dec.device, dec.dtype) == (torch.device("cpu"), torch.bfloat16)
    cache = KVCache()
    logits = dec.prefill(torch.tensor(prompt(tok, "Hi there")), cache, -1)
    assert logits.dtype == torch.float32 and logits.shape == (model.config.vocab_size,)
    assert {t.dtype for t in cache.keys + cache.values} == {torch.bfloat16} and cache.length == 8


def test_sampling_takes_bfloat16_logits():
    logits = torch.randn(300, generator=torch.Generator().manual_seed(0))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert sample_token(logits.bfloat16(), 0.0, 1.0, g()) == int(torch.argmax(logits.bfloat16().float()))
    drawn = sample_token(logits.bfloat16(), 0.7, 0.9, g())
    assert drawn == sample_token(logits.bfloat16().float(), 0.7, 0.9, g())  # drawn in float64 alike


def test_bf16_engine_stays_near_the_float32_greedy_answer(adapter_paths):
    """The check test_cuda.py applies to the GPU, here on the CPU's bfloat16: every token the
    bfloat16 engine picks is within BF16_LOGIT_TOLERANCE of the float32 model's best."""
    model32, tok = load_base_model("tiny-qwen2", verbose=False)
    model, _ = load_base_model("tiny-qwen2", dtype=torch.bfloat16, verbose=False)
    reg = AdapterRegistry(model, max_loras=2)
    for name, path in adapter_paths.items():
        reg.load(name, path)
    eng = Engine(model, tok, reg)
    try:
        for name in (None, "a", "b"):
            ref = model32 if name is None else with_adapter(model32, adapter_paths[name])
            for text in PROMPTS:
                ids = prompt(tok, text)
                got = eng.generate(ids, name, SamplingParams(max_tokens=12, ignore_eos=True))
                assert max(near_greedy_gaps(ref, ids, got)) <= BF16_LOGIT_TOLERANCE, (text, name)
    finally:
        eng.close()


# ---- bfloat16 on the CPU, a real server -------------------------------------------------------
def test_server_on_cpu_in_bfloat16(adapter_paths):
    args = ["--model", "tiny-qwen2", "--device", "cpu", "--dtype", "bfloat16",
            "--lora-modules", f"a={adapter_paths['a']}"]
    model, tok = load_base_model("tiny-qwen2", dtype=torch.bfloat16, verbose=False)
    eos = {model.generation_config.eos_token_id, tok.eos_token_id} - {None}
    with running_server(args) as (url, proc):
        lines = []
        while not lines or not lines[-1].startswith("loracore.serve:"):
            lines.append(proc.stdout.readline().decode())  # printed before the server answered
        assert lines[-1].startswith("loracore.serve: tiny-qwen2 on cpu in bfloat16 with adapters ['a'] on http://")
        for name, ref in (("tiny-qwen2", model),
                          ("a", with_adapter(model, adapter_paths["a"]).to(torch.bfloat16))):
            r = post(url, "/v1/completions", {"model": name, "prompt": "Once", "max_tokens": 6, "temperature": 0})
            assert r.status_code == 200, r.text
            want = greedy(ref, prompt(tok, "Once"), 6, eos)
            assert r.json()["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True), name
