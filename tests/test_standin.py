"""tools/qwen2_standin.py: the Qwen2 stand-in that lets CI run the ``qwen2-0.5b`` path offline.

The fast tests build the stand-in from a tiny Llama put in SmolLM2's place (milliseconds of
weights, the same code path): its layout, all or nothing, reuse, refusal of a real model, and the
``qwen2-0.5b`` path finding it in a subprocess. The ``slow`` tests build it from the real
SmolLM2-135M once per module (two variants, tied and untied head) and check that it computes
SmolLM2's function, and that the library's operations hold on Qwen2's structure (q/k/v biases,
untied head). Every HF_HOME here is a temporary folder, never ~/.cache/huggingface.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import randomize_B, run_script

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import qwen2_standin as q  # noqa: E402

import loracore.models  # noqa: E402
from loracore.models import QWEN2_REPO, STANDIN_NOTE  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]


# --------------------------------------------------------------------------- helpers


def found(hf_home: Path) -> list[str | None]:
    """What huggingface_hub finds for Qwen2-0.5B's config and weights under ``hf_home``, as the
    ``qwen2-0.5b`` path asks (a path, or something that is not one)."""
    from huggingface_hub import try_to_load_from_cache

    return [try_to_load_from_cache(QWEN2_REPO, f, cache_dir=hf_home / "hub")
            for f in ("config.json", "model.safetensors")]


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, and a file's bytes and time (a link's target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = ("link", os.readlink(p))
        elif p.is_dir():
            out[str(p.relative_to(root))] = ("dir",)  # its time changes with a sibling's rename
        else:
            out[str(p.relative_to(root))] = ("file", p.read_bytes(), p.stat().st_mtime_ns)
    return out


def hidden_leftovers(hf_home: Path) -> list[str]:
    return [p.name for p in (q.repo_dir(hf_home) / "snapshots").iterdir() if p.name.startswith(".")]


PROBE = r"""
import contextlib, io, json
from loracore.models import load_base_model, resolve_model_name
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    model, tokenizer = load_base_model()
attn = model.model.layers[0].self_attn
print(json.dumps({
    "resolved": resolve_model_name(), "line": printed.getvalue(), "class": type(model).__name__,
    "biases": [getattr(attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj")],
    "tied": model.lm_head.weight is model.model.embed_tokens.weight,
    "params": sum(p.numel() for p in model.parameters()),
    "vocab": model.config.vocab_size, "hidden": model.config.hidden_size,
}))
"""


def qwen2_path(hf_home: Path) -> dict:
    """Run load_base_model() in a subprocess as CI's notebooks would: HF_HOME at the stand-in's
    cache (huggingface_hub reads it at import, hence a fresh process), offline, no model asked for."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "LORACORE_BASE_MODEL"}}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def logits(model, ids: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**ids).logits


# --------------------------------------------------------------------------- fast: a tiny Llama as "SmolLM2"


@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory) -> Path:
    """A tiny tied Llama saved like SmolLM2's cache folder (config, weights, tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = loracore.models.byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny-smollm2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def fake(monkeypatch, tiny_llama_folder) -> Path:
    """The stand-in is built from the tiny Llama instead of SmolLM2."""
    monkeypatch.setattr(loracore.models, "build_smollm2_cache", lambda **kwargs: tiny_llama_folder)
    return tiny_llama_folder


@pytest.mark.parametrize("tied", [False, True])
def test_the_layout_is_the_hub_caches_and_the_function_is_the_llamas(fake, tmp_path, tied):
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    snapshot = q.build_standin(tmp_path, tied=tied)
    rev = q.standin_revision(tied)
    assert len(rev) == 40 and int(rev, 16) >= 0 and rev != q.standin_revision(not tied)
    assert snapshot == tmp_path / "hub" / "models--Qwen--Qwen2-0.5B-Instruct" / "snapshots" / rev
    assert (snapshot.parent.parent / "refs" / "main").read_text() == rev
    assert found(tmp_path) == [str(snapshot / "config.json"), str(snapshot / "model.safetensors")]
    config = json.loads((snapshot / "config.json").read_text())
    assert config["loracore_standin"] is True and config["architectures"] == ["Qwen2ForCausalLM"]
    assert "not Qwen2-0.5B" in config["_name_or_path"] and config["tie_word_embeddings"] is tied
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in snapshot.iterdir()}

    ours = Qwen2ForCausalLM.from_pretrained(snapshot).eval()
    llama = LlamaForCausalLM.from_pretrained(fake).eval()
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(ours.model.layers[1].self_attn, proj).bias,
                           torch.zeros(getattr(llama.model.layers[1].self_attn, proj).out_features))
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) is tied
    torch.testing.assert_close(ours.lm_head.weight, llama.lm_head.weight, atol=0, rtol=0)
    ids = torch.randint(0, ours.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(input_ids=ids).logits, llama(input_ids=ids).logits, atol=1e-6, rtol=0)
    n_ours, n_llama = (sum(p.numel() for p in m.parameters()) for m in (ours, llama))
    biases = sum(getattr(a, p).out_features for layer in llama.model.layers
                 for a in [layer.self_attn] for p in ("q_proj", "k_proj", "v_proj"))
    assert n_ours - n_llama == biases + (0 if tied else llama.config.vocab_size * llama.config.hidden_size)


def test_the_qwen2_path_finds_it_in_a_fresh_process_and_says_it_is_a_stand_in(fake, tmp_path):
    q.build_standin(tmp_path)
    seen = qwen2_path(tmp_path)
    assert seen["resolved"][0] == "qwen2-0.5b" and "local Hugging Face cache" in seen["resolved"][1]
    assert seen["class"] == "Qwen2ForCausalLM" and seen["biases"] == [True] * 3 and not seen["tied"]
    assert seen["line"].count("\n") == 1 and seen["line"].strip().endswith(STANDIN_NOTE)


def test_the_model_line_names_the_stand_in_only_when_the_cache_holds_one(
        fake, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    models = loracore.models
    monkeypatch.setattr(models, "_load_qwen2", lambda dtype: models.build_tiny_qwen2(dtype=dtype))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # empty for now
    usual = "loracore: base model 'qwen2-0.5b': Qwen/Qwen2-0.5B-Instruct from the Hugging Face " \
            "Hub (needs a network) (asked for by name)"
    for name in ("qwen2-0.5b", "tiny-qwen2"):
        models.load_base_model(name)
    assert capsys.readouterr().out.splitlines() == [
        usual, f"loracore: base model 'tiny-qwen2': {models.KNOWN_MODELS['tiny-qwen2']} "
               "(asked for by name)"]
    q.build_standin(tmp_path)
    models.load_base_model("qwen2-0.5b")
    assert capsys.readouterr().out == usual + STANDIN_NOTE + "\n"


def test_a_complete_stand_in_is_reused_without_writing(fake, tmp_path, monkeypatch, capsys):
    snapshot = q.build_standin(tmp_path)
    before = tree(tmp_path / "hub")  # the lock file beside it is reopened (its time changes)

    def no_build(*args, **kwargs):
        raise AssertionError("a complete stand-in was rebuilt")

    monkeypatch.setattr(q, "_write_snapshot", no_build)
    start = time.perf_counter()
    assert q.main([str(tmp_path)]) == 0
    assert time.perf_counter() - start < 1.0
    assert tree(tmp_path / "hub") == before
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("qwen2_standin: reused the untied-head")
    assert str(snapshot) in out  # tmp_path is not under the working folder: shown whole


@pytest.mark.parametrize("damage", ["truncate", "flip", "tokenizer", "manifest"])
def test_a_damaged_stand_in_is_detected_and_rebuilt(fake, tmp_path, damage):
    snapshot = q.build_standin(tmp_path)
    good = tree(snapshot)
    target = {"truncate": "model.safetensors", "flip": "model.safetensors",
              "tokenizer": "tokenizer.json", "manifest": "loracore-manifest.json"}[damage]
    data = bytearray((snapshot / target).read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-3] ^= 0xFF
    (snapshot / target).write_bytes(bytes(data))
    assert q.cache_problem(snapshot) is not None
    q.build_standin(tmp_path)
    assert q.cache_problem(snapshot) is None
    assert {k: v[1] for k, v in tree(snapshot).items()} == {k: v[1] for k, v in good.items()}
    assert found(tmp_path)[0] == str(snapshot / "config.json") and hidden_leftovers(tmp_path) == []


def test_the_cli_prints_one_line_with_a_path_relative_to_the_working_folder(
        fake, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert q.main(["hf", "--tied"]) == 0
    out = capsys.readouterr().out
    rel = f"hf/hub/models--Qwen--Qwen2-0.5B-Instruct/snapshots/{q.standin_revision(True)}"
    assert out.count("\n") == 1 and out.startswith("qwen2_standin: built the tied-head") and rel in out
    assert out.rstrip().endswith(" s") and str(tmp_path) not in out


def test_switching_variant_replaces_the_other_one(fake, tmp_path):
    untied = q.build_standin(tmp_path)
    tied = q.build_standin(tmp_path, tied=True)
    assert not untied.exists() and sorted(p.name for p in tied.parent.iterdir()) == [tied.name]
    assert found(tmp_path)[0] == str(tied / "config.json")


def test_force_rebuilds(fake, tmp_path, capsys):
    q.build_standin(tmp_path)
    q.build_standin(tmp_path, force=True, verbose=True)
    assert "rebuilt (rebuild requested)" in capsys.readouterr().out


REAL_LAYOUTS = {
    # a real download: refs/main, blobs, a snapshot of links into the blobs (no marker)
    "complete": {"refs/main": "0123456789abcdef0123456789abcdef01234567",
                 "blobs/aa11": '{"model_type": "qwen2"}',
                 "snapshots/0123456789abcdef0123456789abcdef01234567/config.json": "->blobs/aa11"},
    # a snapshot with a plain config and no marker, no refs
    "unmarked": {"snapshots/0123456789abcdef0123456789abcdef01234567/config.json": "{}"},
    # a download cut short: refs/main and a partial blob, no snapshot yet
    "partial": {"refs/main": "0123456789abcdef0123456789abcdef01234567",
                "blobs/bb22.incomplete": "half"},
}


@pytest.mark.parametrize("layout", sorted(REAL_LAYOUTS))
def test_a_real_copy_of_qwen2_is_refused_and_left_untouched(fake, tmp_path, layout, capsys):
    repo = q.repo_dir(tmp_path)
    for rel, content in REAL_LAYOUTS[layout].items():
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content.startswith("->"):
            path.symlink_to(os.path.relpath(repo / content[2:], path.parent))
        else:
            path.write_text(content)
    before = tree(tmp_path)
    with pytest.raises(q.StandinRefused, match=r"models--Qwen--Qwen2-0\.5B-Instruct holds a copy "
                                               r"of Qwen/Qwen2-0\.5B-Instruct that is not a "
                                               r"loracore stand-in \(.+\); the stand-in is never "
                                               r"written over a real model"):
        q.build_standin(tmp_path, force=True)
    assert q.main([str(tmp_path), "--force"]) == 1
    assert "qwen2_standin: refused:" in capsys.readouterr().err
    assert tree(tmp_path) == before  # not even the lock file


def test_a_file_given_as_hf_home_is_refused_by_name(fake, tmp_path):
    (tmp_path / "hf").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"HF_HOME .*hf is a file, not a folder"):
        q.build_standin(tmp_path / "hf")


@pytest.mark.parametrize("where", ["write_manifest", "atomic_write_text"])
def test_an_exception_half_way_leaves_nothing_the_qwen2_path_finds(fake, tmp_path, monkeypatch, where):
    """write_manifest: the weights, config and tokenizer are written, the manifest is not;
    atomic_write_text: the snapshot is complete and in place, refs/main is not written."""
    real = getattr(q, where)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(q, where, crash)
    with pytest.raises(KeyboardInterrupt):
        q.build_standin(tmp_path)
    assert found(tmp_path) == [None, None] and hidden_leftovers(tmp_path) == []
    monkeypatch.setattr(q, where, real)
    snapshot = q.build_standin(tmp_path)
    assert found(tmp_path)[1] == str(snapshot / "model.safetensors")


def test_an_interrupted_forced_rebuild_keeps_the_complete_stand_in(fake, tmp_path, monkeypatch):
    snapshot = q.build_standin(tmp_path)
    before = tree(tmp_path / "hub")
    monkeypatch.setattr(q, "write_manifest", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        q.build_standin(tmp_path, force=True)
    assert tree(tmp_path / "hub") == before and found(tmp_path)[0] == str(snapshot / "config.json")


KILL = r"""
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tools!r})
import loracore.models
import qwen2_standin as q
loracore.models.build_smollm2_cache = lambda **kwargs: Path({source!r})
setattr(q, {where!r}, lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))
q.build_standin(Path({hf_home!r}))
"""


@pytest.mark.parametrize("where", ["write_manifest", "atomic_write_text"])
def test_sigkill_half_way_leaves_nothing_the_qwen2_path_finds(fake, tmp_path, where):
    script = KILL.format(tools=str(ROOT / "tools"), source=str(fake), where=where,
                         hf_home=str(tmp_path))
    proc = run_script(script, [], timeout=300)  # a child process (conftest.run_script)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert found(tmp_path) == [None, None]
    assert not (q.repo_dir(tmp_path) / "refs" / "main").exists()
    snapshot = q.build_standin(tmp_path)  # finishes or redoes the build, removes the leftovers
    assert found(tmp_path)[0] == str(snapshot / "config.json") and hidden_leftovers(tmp_path) == []


# --------------------------------------------------------------------------- slow: the real SmolLM2


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[bool, Path]:
    """Both variants built from the real SmolLM2-135M: {tied: HF_HOME}."""
    homes = {}
    for tied in (False, True):
        homes[tied] = tmp_path_factory.mktemp("tied" if tied else "untied")
        q.build_standin(homes[tied], tied=tied)
    return homes


def load_standin(hf_home: Path, tied: bool, biased: bool = False):
    """A fresh stand-in from its snapshot; ``biased``: seeded non-zero q/k/v biases."""
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(hf_home / "hub" / q.REPO_FOLDER / "snapshots" /
                                             q.standin_revision(tied), dtype=torch.float32).eval()
    if biased:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in ("q_proj", "k_proj", "v_proj"):
                    bias = getattr(layer.self_attn, proj).bias
                    bias.copy_(torch.randn(bias.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def smollm2_answers() -> dict[str, tuple[dict, torch.Tensor, torch.Tensor]]:
    """SmolLM2's own function on PROMPTS, computed once for both variants:
    {prompt: (token ids, logits (1, seq, vocab), 16 greedy tokens after the prompt)}."""
    reference, tokenizer = loracore.models.load_base_model("smollm2-135m", verbose=False)
    answers = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            answers[prompt] = (ids, logits(reference, ids),
                               reference.generate(**ids, max_new_tokens=16, do_sample=False))
    return answers


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_the_stand_in_computes_smollm2s_function(real, smollm2_answers, tied):
    ours = load_standin(real[tied], tied)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) is tied
    worst = 0.0
    for prompt, (ids, want, theirs) in smollm2_answers.items():
        diff = (logits(ours, ids) - want).abs().max().item()
        worst = max(worst, diff)
        with torch.no_grad():
            mine = ours.generate(**ids, max_new_tokens=16, do_sample=False)
        assert torch.equal(mine, theirs), prompt
    print(f"stand-in ({'tied' if tied else 'untied'}) vs SmolLM2: max |logit diff| = {worst:.3g}")
    assert worst <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_the_qwen2_path_loads_the_stand_in_with_biases_and_the_right_head(real, tied):
    seen = qwen2_path(real[tied])
    assert seen["resolved"][0] == "qwen2-0.5b" and "local Hugging Face cache" in seen["resolved"][1]
    assert seen["class"] == "Qwen2ForCausalLM" and seen["biases"] == [True] * 3
    assert seen["tied"] is tied and seen["line"].strip().endswith(STANDIN_NOTE)
    n_tied = 134_515_008 + 30 * (576 + 192 + 192)  # SmolLM2's parameters, plus the q/k/v biases
    assert seen["params"] == n_tied + (0 if tied else 49152 * 576)  # untied: a head of its own


@pytest.mark.slow
def test_the_real_stand_in_is_reused_fast_and_rebuilt_when_truncated(real, monkeypatch):
    snapshot = q.build_standin(real[False])
    start = time.perf_counter()
    assert q.build_standin(real[False]) == snapshot
    assert time.perf_counter() - start < 2.0  # hashes ~650 MB: about 0.5 s on a quiet machine
    weights = snapshot / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size - 4096)
    assert "model.safetensors has" in q.cache_problem(snapshot)
    q.build_standin(real[False])
    assert q.cache_problem(snapshot) is None


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]  # lm_head: untied, so adaptable


@pytest.mark.slow
def test_an_adapter_saved_on_the_biased_stand_in_loads_into_a_fresh_one(real, tmp_path):
    from loracore.adapters import load_adapter, save_adapter
    from loracore.lora import inject

    ids = {"input_ids": torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))}
    ours = inject(load_standin(real[False], False, biased=True), TARGETS, r=4, lora_alpha=8)
    randomize_B(ours)
    want = logits(ours, ids)
    save_adapter(ours, tmp_path / "adapter")
    del ours
    fresh = load_adapter(load_standin(real[False], False, biased=True), tmp_path / "adapter")
    assert torch.equal(logits(fresh, ids), want)


@pytest.mark.slow
def test_merge_and_unmerge_are_exact_with_non_zero_biases_and_an_untied_head(real):
    from loracore.lora import inject, merge_adapters, unmerge_adapters

    ids = {"input_ids": torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))}
    model = inject(load_standin(real[False], False, biased=True), TARGETS, r=4, lora_alpha=8)
    randomize_B(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = logits(model, ids)
    merge_adapters(model)
    assert not torch.equal(model.lm_head.base_layer.weight, weights["lm_head.base_layer.weight"])
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-4, rtol=1e-4)
    unmerge_adapters(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert torch.equal(logits(model, ids), unmerged)


@pytest.mark.slow
def test_peft_parity_on_the_biased_untied_stand_in(real):
    peft = pytest.importorskip("peft")
    from loracore.lora import inject, lora_layers

    ids = {"input_ids": torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))}
    ours = inject(load_standin(real[False], False, biased=True), TARGETS, r=4, lora_alpha=8)
    randomize_B(ours)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(load_standin(real[False], False, biased=True), config).eval()
    copied = 0
    with torch.no_grad():
        for name, module in theirs.base_model.model.named_modules():
            if isinstance(module, peft.tuners.lora.Linear):
                mine = lora_layers(ours)[name]
                for d in ("lora_A", "lora_B"):
                    getattr(module, d)["default"].weight.copy_(getattr(mine, d)["default"].weight)
                copied += 1
    assert copied == len(lora_layers(ours)) == 30 * 4 + 1
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=1e-5, rtol=0)
