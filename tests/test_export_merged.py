"""merge_and_save and ``loracore export merged``: a plain transformers folder with the adapter
merged in, equal to PEFT's ``merge_and_unload()``; the caller's model unchanged; all or nothing.

Tolerances. The merged weights are compared with PEFT's merged weights exactly (atol 0): both
compute ``W + scaling · (B @ A)`` in float32 with the same operations, so they agree bit for
bit, and so do the logits of the reloaded folder and PEFT's merged model. The one comparison
with a tolerance is merged against *unmerged* (loracore's LoRA layers computing
``x @ W.T + scaling · (x @ A.T) @ B.T``): another order of float32 operations, so 1e-5 on
logits of size ~1 (measured about 4e-7), the float32 rounding of two 2-layer forward passes.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_unchanged, fail_on_call, randomize_B, snapshot, tiny_qwen2
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import loracore.merged as merged_module
from loracore.adapters import save_adapter
from loracore.cli import main
from loracore.export import base_for_adapter
from loracore.merged import merge_and_save
from loracore.models import QWEN2_REPO, build_tiny_qwen2, load_base_model, smollm2_cache_dir
from loracore.qlora import quantize_model
from loracore.surgery import inject, lora_layers, merge_adapters

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402

FILES = {"config.json", "generation_config.json", "model.safetensors"}
TOKENS = torch.tensor([[5, 70, 101, 33, 100, 17, 64, 3], [9, 9, 120, 45, 2, 125, 31, 77]])  # < 128


def adapted(model, *, use_dora: bool = False, targets="all-linear"):
    """``model`` with a non-zero rank-4 adapter (alpha 8) on ``targets``, in eval mode."""
    inject(model, targets, r=4, lora_alpha=8, use_dora=use_dora)
    randomize_B(model)
    if use_dora:  # a magnitude away from ‖W‖, or DoRA's rescaling is nearly 1
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                m = layer.lora_magnitude_vector["default"].weight
                m.mul_(1 + 0.2 * torch.rand(m.shape, generator=g))
    return model.eval()


def peft_merged(fresh_base, adapter_folder: Path):
    """PEFT's merge_and_unload of the adapter file on a fresh copy of the same base."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own deprecation notices
        return PeftModel.from_pretrained(fresh_base, adapter_folder).merge_and_unload().eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_the_folder_loads_as_peft_merge_and_unload(tmp_path, use_dora):
    model, tokenizer = load_base_model("tiny-qwen2", verbose=False)
    adapted(model, use_dora=use_dora)
    save_adapter(model, tmp_path / "adapter")
    before = snapshot(model)

    out = merge_and_save(model, tmp_path / "merged", tokenizer=tokenizer)

    assert_unchanged(model, before)  # the caller's model keeps its LoRA layers, unmerged
    assert FILES <= {p.name for p in out.iterdir()} and (out / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in k for k in reloaded.state_dict())
    reference = peft_merged(load_base_model("tiny-qwen2", verbose=False)[0], tmp_path / "adapter")
    assert_same_weights(reloaded, reference)
    assert torch.equal(logits(reloaded), logits(reference))
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-5)
    assert not torch.allclose(logits(reloaded), logits(load_base_model("tiny-qwen2", verbose=False)[0]),
                              atol=1e-3), "the adapter changed nothing: the test would prove nothing"


@pytest.mark.parametrize("tied", [True, False], ids=["tied-like-smollm2", "untied"])
def test_tied_embeddings_stay_as_the_config_says(tmp_path, tied):
    model = adapted(tiny_qwen2(tied=tied))
    save_adapter(model, tmp_path / "adapter")
    out = merge_and_save(model, tmp_path / "merged")

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) is not tied  # a tied head is written once
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    shared = reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert shared is tied
    reference = peft_merged(tiny_qwen2(tied=tied), tmp_path / "adapter")
    assert_same_weights(reloaded, reference)
    assert torch.equal(logits(reloaded), logits(reference))


def test_an_untied_head_of_a_tied_config_is_written_untied(tmp_path):
    """The advice merge_adapters gives (untie the head by cloning its weight): the saved model
    must then keep its own head, so its config says untied."""
    model = tiny_qwen2(tied=True)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 1.5)
    adapted(model, targets=["q_proj", "lm_head"])
    out = merge_and_save(model, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-5)


def test_merged_state_and_adapter_names(tmp_path):
    """Already merged, or not: the same file; adapter_names picks the adapters merged."""
    model = adapted(tiny_qwen2())
    inject(model, ["v_proj"], r=2, lora_alpha=2, adapter_name="other")
    randomize_B(model, seed=5)
    merge_and_save(model, tmp_path / "a", adapter_names=["default"])
    merge_adapters(model, ["default"])
    before = snapshot(model)
    merge_and_save(model, tmp_path / "b", adapter_names=["default"])
    assert_unchanged(model, before)  # still merged, exactly as it was
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the default (what the model computes now: "default" merged, "other" active) differs
    merge_and_save(model, tmp_path / "c")
    c = load_file(tmp_path / "c" / "model.safetensors")
    assert not torch.equal(c["model.layers.0.self_attn.v_proj.weight"],
                           a["model.layers.0.self_attn.v_proj.weight"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("previous", [False, True], ids=["new-folder", "over-a-previous-folder"])
def test_a_failure_half_way_leaves_no_half_folder(tmp_path, monkeypatch, previous):
    model = adapted(tiny_qwen2())
    out = tmp_path / "merged"
    if previous:
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"the previous model")
        (out / "config.json").write_text("{}")
    before = snapshot(model)
    # the 1st write (config.json) succeeds, the 2nd (generation_config.json) raises
    fail_on_call(monkeypatch, merged_module, "write_bytes", 2, OSError(28, "No space left on device"))
    kept = "still holds its previous version" if previous else "nothing was written"
    with pytest.raises(OSError, match=f"the disk is full.*; .*{kept}"):
        merge_and_save(model, out, overwrite=True)
    assert_unchanged(model, before)
    if previous:
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        assert (out / "model.safetensors").read_bytes() == b"the previous model"
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["merged"] if previous else [])  # no hidden leftovers


def test_refusals_write_nothing_and_change_nothing(tmp_path):
    model = adapted(tiny_qwen2())
    before = snapshot(model)
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        merge_and_save(model, full)
    assert [p.name for p in full.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        merge_and_save(model, tmp_path / "file")
    with pytest.raises(KeyError, match="no adapter named \\['nope'\\]"):
        merge_and_save(model, tmp_path / "out", adapter_names=["nope"])
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="no LoRA layers.*save_pretrained"):
        merge_and_save(tiny_qwen2(), tmp_path / "out")
    tied_head = adapted(tiny_qwen2(tied=True), targets=["lm_head"])
    with pytest.raises(ValueError, match="'lm_head' is tied to \\['model.embed_tokens.weight'\\]"):
        merge_and_save(tied_head, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert merge_and_save(model, full, overwrite=True) == full.resolve()
    assert "notes.txt" not in {p.name for p in full.iterdir()}  # replaced whole


def test_a_4bit_base_is_refused_with_the_way_out(tmp_path, capsys):
    model, _ = load_base_model("tiny-qwen2", verbose=False)
    quantize_model(model)
    adapted(model)
    with pytest.raises(TypeError, match="Linear4bit, stored quantized.*Dequantize first.*load_adapter"):
        merge_and_save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the way out it names: the QLoRA adapter merged into the float base
    save_adapter(model, tmp_path / "qlora")
    assert main(["export", "merged", str(tmp_path / "qlora"), "--out", str(tmp_path / "out"),
                 "--base", "tiny-qwen2"]) == 0, capsys.readouterr().err
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    reference = peft_merged(load_base_model("tiny-qwen2", verbose=False)[0], tmp_path / "qlora")
    assert torch.equal(logits(reloaded), logits(reference))


def test_the_command(tmp_path, capsys):
    model, _ = load_base_model("tiny-qwen2", verbose=False)
    save_adapter(adapted(model), tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["export", "merged", str(tmp_path / "adapter"), "--out", str(out),
                 "--base", "tiny-qwen2"]) == 0
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = peft_merged(load_base_model("tiny-qwen2", verbose=False)[0], tmp_path / "adapter")
    assert torch.equal(logits(reloaded), logits(reference))
    assert (out / "tokenizer.json").is_file()

    # refusals: one line on stderr and exit status 2 (all but the last before any model loads)
    capsys.readouterr()

    def refused(*argv: str) -> str:
        assert main(["export", "merged", *argv]) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines()
                 if ln.startswith("loracore export merged: error: ")]
        assert lines
        return "\n".join(lines)

    assert "not empty" in refused(str(tmp_path / "adapter"), "--out", str(out), "--base", "tiny-qwen2")
    assert "pass --base" in refused(str(tmp_path / "adapter"), "--out", str(tmp_path / "x"))
    assert "adapter's own folder" in refused(str(tmp_path / "adapter"), "--out",
                                             str(tmp_path / "adapter"), "--overwrite")
    assert "no adapter folder" in refused(str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    other, other_tokenizer = build_tiny_qwen2(seed=1)  # same shapes, other weights
    other.save_pretrained(tmp_path / "other")
    other_tokenizer.save_pretrained(tmp_path / "other")
    assert "different base model" in refused(str(tmp_path / "adapter"), "--out", str(tmp_path / "x"),
                                             "--base", str(tmp_path / "other"))
    assert not (tmp_path / "x").exists()


def test_the_base_an_adapter_config_names(tmp_path):
    def named(value):
        return base_for_adapter({"base_model_name_or_path": value})

    assert named(QWEN2_REPO) == "qwen2-0.5b"
    assert named(str(smollm2_cache_dir())) == "smollm2-135m"  # where save_adapter records it
    assert named("tiny-qwen2") == "tiny-qwen2"
    assert named(str(tmp_path)) == str(tmp_path)  # a local model folder
    assert named(None) is None and named("") is None and named("someone/else") is None


def test_a_bfloat16_model_is_written_in_bfloat16_as_peft_merges_it(tmp_path):
    """Weights only: a bf16 model built by ``.to(bfloat16)`` keeps its rotary frequencies in
    bf16, where ``from_pretrained(dtype=bfloat16)`` keeps them in float32, so the two models'
    logits differ for a reason that has nothing to do with merging."""
    model, _ = load_base_model("tiny-qwen2", dtype=torch.bfloat16, verbose=False)
    adapted(model)  # adapters in float32 on the bf16 base
    save_adapter(model, tmp_path / "adapter")
    out = merge_and_save(model, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    written = load_file(out / "model.safetensors")
    reference = peft_merged(load_base_model("tiny-qwen2", dtype=torch.bfloat16, verbose=False)[0],
                            tmp_path / "adapter").state_dict()
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert written.keys() == reference.keys() - {"lm_head.weight"}
    for key, tensor in written.items():
        assert torch.equal(tensor, reference[key]), key
