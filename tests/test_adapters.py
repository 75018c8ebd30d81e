"""Adapter files (loracore/adapters.py): PEFT's format, the base fingerprint, the refusals,
and hostile inputs and faults (damaged files, a failure half-way, SIGKILL during a save).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

import loracore.adapters as adapters
import loracore.atomic as atomic
import loracore.surgery as surgery
from conftest import Q0, assert_unchanged, fail_on_call, randomize_B, snapshot, tiny_qwen2
from loracore.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from loracore.lora import inject, lora_layers, merge_adapters


@pytest.fixture
def base():
    return tiny_qwen2()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def trained(base):
    """``base`` with a q/v adapter whose B is non-zero, as after training."""
    model = inject(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    randomize_B(model)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_files_use_peft_key_names_and_config_fields(trained, tmp_path):
    folder = save_adapter(trained, tmp_path / "ad")
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight").shape == (32, 4)
    assert keys == {f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{ab}.weight"
                    for i in range(2) for p in ("q_proj", "v_proj") for ab in "AB"}
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["use_rslora"] is False
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert "loracore" not in config  # PEFT's keys only: PEFT loads it without a warning
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
        ours = json.loads(f.metadata()["loracore"])
    fp = ours["base_fingerprint"]
    assert fp["architecture"] == "Qwen2ForCausalLM"
    assert fp["targets"]["model.layers.0.self_attn.v_proj"] == [32, 64]
    assert len(fp["weights_sha256"]) == 64 and fp["quantized_sha256"] is None
    assert ours["config"] == {"r": 4, "lora_alpha": 8, "use_rslora": False,
                              "rank_pattern": {}, "alpha_pattern": {}}


def test_round_trip_gives_the_same_logits(base, trained, tmp_path, ids):
    save_adapter(trained, tmp_path / "ad")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "ad")
    assert torch.equal(logits(loaded, ids), logits(trained, ids))
    assert not torch.allclose(logits(loaded, ids), logits(base, ids))
    assert sorted(lora_layers(loaded)) == sorted(lora_layers(trained))


def test_load_as_a_second_named_adapter(base, trained, tmp_path, ids):
    save_adapter(trained, tmp_path / "ad")
    model = inject(copy.deepcopy(base), ["q_proj"], r=2, lora_alpha=2)
    load_adapter(model, tmp_path / "ad", adapter_name="task")
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert sorted(layer.lora_A) == ["default", "task"] and layer.active_adapters == ["task"]
    assert torch.equal(logits(model, ids), logits(trained, ids))
    with pytest.raises(ValueError, match="already has an adapter named 'task'"):
        load_adapter(model, tmp_path / "ad", adapter_name="task")


def test_rank_and_alpha_patterns_round_trip(base, tmp_path, ids):
    other = copy.deepcopy(base)
    inject(other, ["q_proj"], r=4, lora_alpha=8)
    lora_layers(other)["model.layers.1.self_attn.q_proj"].delete_adapter("default")
    lora_layers(other)["model.layers.1.self_attn.q_proj"].add_adapter("default", r=2, lora_alpha=6)
    randomize_B(other)
    save_adapter(other, tmp_path / "mixed")
    config = json.loads((tmp_path / "mixed" / CONFIG_NAME).read_text())
    assert config["rank_pattern"] and config["alpha_pattern"]
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "mixed")
    assert lora_layers(loaded)["model.layers.1.self_attn.q_proj"].r["default"] == 2
    assert torch.equal(logits(loaded, ids), logits(other, ids))


def test_target_modules_fall_back_to_a_full_name_regex(base, tmp_path):
    model = inject(copy.deepcopy(base), ["model.layers.0.self_attn.q_proj"], r=2, lora_alpha=2)
    save_adapter(model, tmp_path / "one")
    config = json.loads((tmp_path / "one" / CONFIG_NAME).read_text())
    assert config["target_modules"] == r"(model\.layers\.0\.self_attn\.q_proj)"


def test_wrong_base_weights_are_refused_unless_not_strict(trained, tmp_path, ids):
    save_adapter(trained, tmp_path / "ad")
    torch.manual_seed(123)
    other = tiny_qwen2()
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.mul_(1.01)  # a "fine-tuned variant"
    with pytest.raises(ValueError, match="different base model") as err:
        load_adapter(other, tmp_path / "ad")
    assert "base weights" in str(err.value) and "strict=False" in str(err.value)
    assert not lora_layers(other)  # nothing was injected
    with pytest.warns(UserWarning, match="different base model"):
        load_adapter(other, tmp_path / "ad", strict=False)
    assert len(lora_layers(other)) == 4


def test_bfloat16_copy_of_the_same_base_is_accepted(base, trained, tmp_path, ids):
    """The fingerprint hashes weights rounded to bfloat16: the same base in bfloat16 matches,
    with no "different base model" refusal or warning, and gets every saved factor."""
    save_adapter(trained, tmp_path / "ad")
    half = copy.deepcopy(base).to(torch.bfloat16)
    bare = logits(half, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # accepted means accepted: not loaded with a warning
        load_adapter(half, tmp_path / "ad")
    got, want = lora_layers(half), lora_layers(trained)
    assert got.keys() == want.keys() and len(got) == 4
    for name, layer in got.items():
        for ab in ("lora_A", "lora_B"):
            w = getattr(layer, ab)["default"].weight
            assert torch.equal(w, getattr(want[name], ab)["default"].weight.to(w.dtype)), (name, ab)
    assert not torch.equal(logits(half, ids), bare)  # the adapter is active


def test_wrong_architecture_is_refused(trained, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    save_adapter(trained, tmp_path / "ad")
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="architecture: adapter was trained on Qwen2ForCausalLM"):
        load_adapter(LlamaForCausalLM(cfg), tmp_path / "ad")


def test_wrong_shapes_name_the_module_and_both_shapes(trained, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    save_adapter(trained, tmp_path / "ad")
    wide = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=128, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2))
    with pytest.raises(ValueError) as err:
        load_adapter(wide, tmp_path / "ad", strict=False)
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "(4, 64)" in msg and "(4, 128)" in msg


def test_missing_module_is_named(trained, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    save_adapter(trained, tmp_path / "ad")
    shallow = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96,
                                           num_hidden_layers=1, num_attention_heads=4,
                                           num_key_value_heads=2))
    with pytest.raises(ValueError, match="model.layers.1.self_attn"):
        load_adapter(shallow, tmp_path / "ad")


def test_pickle_files_are_refused(base, trained, tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    torch.save({"x": torch.zeros(1)}, folder / "adapter_model.bin")
    (folder / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    with pytest.raises(ValueError, match="only safetensors.*arbitrary code"):
        load_adapter(base, folder)
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter.pt")
    with pytest.raises(ValueError, match="pickle file"):
        load_adapter(base, tmp_path / "adapter.pt")
    with pytest.raises(FileNotFoundError):
        load_adapter(base, tmp_path / "nothing-here")


def test_save_refusals(trained, tmp_path):
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        save_adapter(trained, tmp_path / "ad", adapter_name="nope")
    merge_adapters(trained)
    with pytest.raises(ValueError, match="unmerge"):
        save_adapter(trained, tmp_path / "ad")


def test_crash_mid_save_keeps_the_previous_adapter(base, trained, tmp_path, ids, monkeypatch):
    folder = save_adapter(trained, tmp_path / "ad")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    randomize_B(trained, seed=99)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(adapters, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(trained, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temp files either
    monkeypatch.undo()
    load_adapter(copy.deepcopy(base), folder)


def test_config_that_no_longer_matches_its_weights_is_detected(base, trained, tmp_path, ids):
    """A config from another save (or edited by hand) would change the scaling silently."""
    a = save_adapter(trained, tmp_path / "a")
    other = inject(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, lora_alpha=16)
    b = save_adapter(other, tmp_path / "b")
    (a / CONFIG_NAME).write_bytes((b / CONFIG_NAME).read_bytes())
    with pytest.raises(ValueError, match=r"lora_alpha: the weights were saved with 8, adapter_config.json says 16"):
        load_adapter(copy.deepcopy(base), a)
    with pytest.warns(UserWarning, match="does not match its weights file"):
        loaded = load_adapter(copy.deepcopy(base), a, strict=False)
    assert next(iter(lora_layers(loaded).values())).lora_alpha["default"] == 16


def test_files_from_an_earlier_loracore_still_load(base, trained, tmp_path, ids):
    """Files saved before the record moved to the header keep it in the config, tied to the
    weights by a save id."""
    folder = save_adapter(trained, tmp_path / "old")
    tensors = safetensors.torch.load_file(str(folder / WEIGHTS_NAME))
    config = json.loads((folder / CONFIG_NAME).read_text())
    fp = adapters.base_fingerprint(trained, list(lora_layers(trained)))
    del fp["quantized_sha256"]  # not in 0.1's record
    safetensors.torch.save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"loracore_save_id": "1"})
    (folder / CONFIG_NAME).write_text(json.dumps(config | {"loracore": {"save_id": "1", "base_fingerprint": fp}}))
    torch.testing.assert_close(logits(load_adapter(copy.deepcopy(base), folder), ids), logits(trained, ids))
    nudged = copy.deepcopy(base)
    with torch.no_grad():
        nudged.model.layers[0].self_attn.q_proj.weight.mul_(1.01)
    with pytest.raises(ValueError, match="hash differently"):
        load_adapter(nudged, folder)
    (folder / CONFIG_NAME).write_text(json.dumps(config | {"loracore": {"save_id": "2", "base_fingerprint": fp}}))
    with pytest.raises(ValueError, match="two different saves"):
        load_adapter(copy.deepcopy(base), folder)


def test_non_lora_tensors_and_configs_are_refused(base, trained, tmp_path):
    folder = save_adapter(trained, tmp_path / "ad")
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(base, folder)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    tensors = safetensors.torch.load_file(str(folder / WEIGHTS_NAME))
    tensors["base_model.model.model.embed_tokens.weight"] = torch.zeros(2, 2)
    safetensors.torch.save_file(tensors, str(folder / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="embed_tokens"):
        load_adapter(base, folder)


def test_unreadable_config_or_record_names_the_file(base, trained, tmp_path):
    folder = save_adapter(trained, tmp_path / "ad")
    good_config = (folder / CONFIG_NAME).read_text()
    (folder / CONFIG_NAME).write_text(good_config[:40])  # cut short
    with pytest.raises(ValueError, match=f"{CONFIG_NAME} is not valid JSON"):
        load_adapter(copy.deepcopy(base), folder)
    (folder / CONFIG_NAME).write_text(good_config)
    tensors = safetensors.torch.load_file(str(folder / WEIGHTS_NAME))
    safetensors.torch.save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"loracore": "{"})
    with pytest.raises(ValueError, match=f"loracore record in .*{WEIGHTS_NAME} is not valid JSON"):
        load_adapter(copy.deepcopy(base), folder)


def test_fingerprint_cache_hashes_once_and_is_really_used(base, trained, tmp_path, monkeypatch):
    """With fingerprint_cache the base is hashed once per set of layers; a cached fingerprint
    is what the check compares against (a wrong one in the cache is refused)."""
    save_adapter(trained, tmp_path / "ad")
    calls = []
    real = adapters.base_fingerprint
    monkeypatch.setattr(adapters, "base_fingerprint", lambda m, names: calls.append(1) or real(m, names))
    cache: dict = {}
    load_adapter(base, tmp_path / "ad", "one", fingerprint_cache=cache)
    load_adapter(base, tmp_path / "ad", "two", fingerprint_cache=cache)
    assert len(calls) == 1 and len(cache) == 1
    key = next(iter(cache))
    cache[key] = dict(cache[key], weights_sha256="0" * 64)  # a cache that lies about the base
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(base, tmp_path / "ad", "three", fingerprint_cache=cache)
    load_adapter(base, tmp_path / "ad", "four")  # without the cache: hashed again, accepted
    assert len(calls) == 2


def test_saving_an_adapter_loaded_onto_another_base_warns(trained, tmp_path):
    save_adapter(trained, tmp_path / "ad")
    other = tiny_qwen2()
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.mul_(1.01)
    with pytest.warns(UserWarning, match="different base model"):
        load_adapter(other, tmp_path / "ad", strict=False)
    with pytest.warns(UserWarning, match="loaded \\(strict=False\\) onto a base it was not trained on"):
        save_adapter(other, tmp_path / "again")
    assert (tmp_path / "again" / WEIGHTS_NAME).exists()


# ---- hostile inputs and faults: refused, or rolled back, and nothing changed -------------
# Each case asserts that the error names its cause (the module, the file, what to do) and
# that nothing changed: the model (conftest.snapshot) and every byte under the folder (tree).
def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) -> SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def saved(trained, tmp_path) -> Path:
    return save_adapter(trained, tmp_path / "ad")


# ---- load_adapter -------------------------------------------------------------------------
def rewrite_weights(folder: Path, edit, keep_metadata: bool = True) -> None:
    """Apply ``edit(tensors)`` to the weights file (keeping loracore's record by default)."""
    from safetensors import safe_open
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
        metadata = f.metadata()
    tensors = safetensors.torch.load_file(str(folder / WEIGHTS_NAME))
    edit(tensors)
    safetensors.torch.save_file(tensors, str(folder / WEIGHTS_NAME),
                                metadata=metadata if keep_metadata else None)


KEY_A = f"base_model.model.{Q0}.lora_A.weight"
KEY_B = f"base_model.model.{Q0}.lora_B.weight"


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


def _nan(key):
    def edit(t):
        t[key] = t[key].clone()
        t[key][0, 0] = float("nan")
    return edit


def _inf(key):
    def edit(t):
        t[key] = t[key].clone()
        t[key][-1, -1] = float("-inf")
    return edit


def _drop(*keys):
    def edit(t):
        for k in keys:
            del t[k]
    return edit


BAD_TENSORS = [
    ("nan", _nan(KEY_B), rf"module '{Q0}': lora_B in .*{WEIGHTS_NAME} holds inf or NaN"),
    ("inf", _inf(KEY_A), rf"module '{Q0}': lora_A in .*{WEIGHTS_NAME} holds inf or NaN"),
    ("zero-dim", _set(KEY_A, torch.tensor(1.0)), rf"module '{Q0}': lora_A .*shape \(\).*2-D"),
    ("one-dim", _set(KEY_B, torch.zeros(64)), rf"module '{Q0}': lora_B .*shape \(64,\)"),
    ("zero-rank", lambda t: t.update({KEY_A: torch.zeros(0, 64), KEY_B: torch.zeros(64, 0)}),
     rf"module '{Q0}': lora_A .*shape \(0, 64\).*rank r >= 1"),
    ("integer", _set(KEY_A, torch.zeros(4, 64, dtype=torch.int32)), rf"lora_A .*torch.int32"),
    ("missing-module", _drop(KEY_A, KEY_B),
     rf"{WEIGHTS_NAME} has no tensors for modules \['{Q0}'\].*incomplete"),
    ("only-A", _drop(KEY_B), rf"module '{Q0}' has only \['lora_A'\] in .*{WEIGHTS_NAME}"),
    ("duplicate", lambda t: t.update({f"base_model.model.{Q0}.lora_A.default.weight": t[KEY_A].clone()}),
     rf"two lora_A tensors for module '{Q0}'"),
    ("empty", lambda t: t.clear(), f"{WEIGHTS_NAME} holds no LoRA tensors"),
]


@pytest.mark.parametrize("what, edit, message", BAD_TENSORS, ids=[c[0] for c in BAD_TENSORS])
def test_load_refuses_bad_tensors_naming_module_and_file(base, saved, tmp_path, what, edit, message):
    rewrite_weights(saved, edit)
    files, before = tree(tmp_path), snapshot(base)
    with pytest.raises(ValueError, match=f"load_adapter: .*{message}"):
        load_adapter(base, saved)
    assert_unchanged(base, before)
    assert tree(tmp_path) == files


def _config(edit):
    def apply(folder: Path) -> None:
        path = folder / CONFIG_NAME
        path.write_bytes(edit(json.loads(path.read_text())))
    return apply


BAD_FILES = [
    ("truncated", lambda f: (f / WEIGHTS_NAME).write_bytes((f / WEIGHTS_NAME).read_bytes()[:200]),
     f"{WEIGHTS_NAME} is not a readable safetensors file.*truncated"),
    ("cut-in-the-data", lambda f: (f / WEIGHTS_NAME).write_bytes((f / WEIGHTS_NAME).read_bytes()[:-10]),
     f"{WEIGHTS_NAME} is not a readable safetensors file"),
    ("not-safetensors", lambda f: (f / WEIGHTS_NAME).write_bytes(b"PK\x03\x04 a zip, not safetensors"),
     f"{WEIGHTS_NAME} is not a readable safetensors file"),
    ("zero-bytes", lambda f: (f / WEIGHTS_NAME).write_bytes(b""),
     f"{WEIGHTS_NAME} is not a readable safetensors file"),
    ("config-list", _config(lambda c: b"[1, 2]"), f"{CONFIG_NAME} holds a JSON list, not an object"),
    ("config-string", _config(lambda c: b'"LORA"'), f"{CONFIG_NAME} holds a JSON str"),
    ("config-not-utf8", _config(lambda c: b'{"r": "\xff"}'), f"{CONFIG_NAME} is not valid JSON"),
    ("alpha-string", _config(lambda c: json.dumps(c | {"lora_alpha": "8"}).encode()),
     f"{CONFIG_NAME}: lora_alpha must be a finite number, got '8'"),
    ("alpha-bool", _config(lambda c: json.dumps(c | {"lora_alpha": True}).encode()),
     f"{CONFIG_NAME}: lora_alpha must be a finite number, got True"),
    ("alpha-null", _config(lambda c: json.dumps(c | {"lora_alpha": None}).encode()),
     f"{CONFIG_NAME}: lora_alpha must be a finite number, got None"),
    ("r-string", _config(lambda c: json.dumps(c | {"r": "4"}).encode()),
     f"{CONFIG_NAME}: r must be a finite number, got '4'"),
    ("alpha-pattern", _config(lambda c: json.dumps(c | {"alpha_pattern": {"q_proj": "x"}}).encode()),
     f"{CONFIG_NAME}: alpha_pattern must map module names to numbers"),
    ("dropout", _config(lambda c: json.dumps(c | {"lora_dropout": 2}).encode()),
     rf"{CONFIG_NAME}: lora_dropout must be a number in \[0, 1\), got 2"),
    ("rslora-string", _config(lambda c: json.dumps(c | {"use_rslora": "yes"}).encode()),
     f"{CONFIG_NAME}: use_rslora must be true or false"),
]


@pytest.mark.parametrize("what, damage, message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_load_refuses_damaged_files_naming_the_file(base, saved, tmp_path, what, damage, message):
    damage(saved)
    files, before = tree(tmp_path), snapshot(base)
    with pytest.raises(ValueError, match=f"load_adapter: .*{message}"):
        load_adapter(base, saved)
    assert_unchanged(base, before)
    assert tree(tmp_path) == files


def test_load_alpha_zero_from_a_peft_config_is_refused(base, saved, tmp_path):
    """A PEFT-written folder (no loracore record) whose config says lora_alpha=0."""
    rewrite_weights(saved, lambda t: None, keep_metadata=False)
    _config(lambda c: json.dumps(c | {"lora_alpha": 0}).encode())(saved)
    files, before = tree(tmp_path), snapshot(base)
    with pytest.raises(ValueError, match=f"load_adapter: .*{CONFIG_NAME} gives module .*lora_alpha=0"):
        load_adapter(base, saved)
    assert_unchanged(base, before)
    assert tree(tmp_path) == files


@pytest.mark.parametrize("name", ["other.safetensors", "README.md", "notes.json"])
def test_load_given_another_file_in_the_folder_refuses_it(base, saved, tmp_path, name):
    """Given a file, load_adapter used to load the folder's adapter_model.safetensors instead."""
    other = saved / name
    other.write_bytes(b"something else the user keeps here")
    files, before = tree(tmp_path), snapshot(base)
    with pytest.raises(ValueError, match=f"load_adapter: .*{name} is a file, not an adapter folder"):
        load_adapter(base, other)
    assert_unchanged(base, before)
    assert tree(tmp_path) == files


@pytest.mark.parametrize("name", [WEIGHTS_NAME, CONFIG_NAME])
def test_load_given_the_folders_own_file_loads_the_folder(base, trained, saved, name):
    load_adapter(base, saved / name)
    torch.testing.assert_close(lora_layers(base)[Q0].lora_B["default"].weight,
                               lora_layers(trained)[Q0].lora_B["default"].weight, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["", "a.b", 3])
def test_load_refuses_a_bad_adapter_name(base, saved, name):
    before = snapshot(base)
    with pytest.raises(ValueError, match="load_adapter: adapter name must be a non-empty string"):
        load_adapter(base, saved, adapter_name=name)
    assert_unchanged(base, before)


def test_load_where_one_module_already_has_the_name_injects_nowhere(base, saved):
    inject(base, ["model.layers.1.self_attn.v_proj"], r=2, lora_alpha=2)
    before = snapshot(base)
    with pytest.raises(ValueError, match="load_adapter: module 'model.layers.1.self_attn.v_proj' "
                                         "already has an adapter named 'default'"):
        load_adapter(base, saved)
    assert_unchanged(base, before)
    load_adapter(base, saved, adapter_name="task")  # the suggested fix works


@pytest.mark.parametrize("where", ["inject", "copy"])
def test_load_failing_half_way_rolls_back_and_a_retry_works(base, saved, monkeypatch, where):
    """The fault comes after the layers are injected (in inject's last step, or while the
    weights are copied in): the model is put back, and a retry is not told 'already has an
    adapter'."""
    before = snapshot(base)
    if where == "inject":
        fail_on_call(monkeypatch, surgery, "set_adapter", 1)
    else:
        fail_on_call(monkeypatch, torch.Tensor, "copy_", 3)
    with pytest.raises(RuntimeError, match="injected failure"):
        load_adapter(base, saved)
    monkeypatch.undo()
    assert_unchanged(base, before)
    load_adapter(base, saved)
    assert len(lora_layers(base)) == 4


# ---- save_adapter: refusals change no file ---------------------------------------------------
def test_save_refusals_leave_every_file_as_it_was(trained, saved, tmp_path):
    (tmp_path / "a-file").write_text("keep me")
    files = tree(tmp_path)
    with pytest.raises(ValueError, match="save_adapter: no adapter named 'nope'"):
        save_adapter(trained, saved, adapter_name="nope")
    with pytest.raises(ValueError, match="save_adapter: .*a-file is a file; give a folder path"):
        save_adapter(trained, tmp_path / "a-file")
    with torch.no_grad():
        lora_layers(trained)[Q0].lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"save_adapter: lora_B of adapter 'default' on module '{Q0}' "
                                         f"holds inf or NaN.*nothing was written"):
        save_adapter(trained, saved)
    with torch.no_grad():
        lora_layers(trained)[Q0].lora_B["default"].weight[0, 0] = 0.0
    merge_adapters(trained)
    with pytest.raises(ValueError, match=f"save_adapter: module '{Q0}' has merged adapters.*unmerge"):
        save_adapter(trained, saved)
    with pytest.raises(ValueError, match="save_adapter: .*unmerge"):
        save_adapter(trained, tmp_path / "new-folder")
    assert tree(tmp_path) == files and not (tmp_path / "new-folder").exists()


def test_save_interrupted_while_writing_leaves_no_trace(trained, saved, tmp_path, monkeypatch):
    files = tree(tmp_path)
    randomize_B(trained, seed=7)

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(adapters, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(trained, saved)
    assert tree(tmp_path) == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


def test_save_keeps_other_files_the_user_put_in_the_folder(trained, saved):
    (saved / "README.md").write_text("my notes")
    (saved / "sub").mkdir()
    (saved / "sub" / "x.txt").write_text("more")
    randomize_B(trained, seed=7)
    save_adapter(trained, saved)
    assert (saved / "README.md").read_text() == "my notes" and (saved / "sub" / "x.txt").read_text() == "more"


# ---- save_adapter under SIGKILL --------------------------------------------------------------
def sigkill_model(seed: int) -> nn.Module:
    """The same small model in this process and in the child: B drawn from ``seed``."""
    torch.manual_seed(0)
    model = inject(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)), ["0", "2"],
                   r=2, lora_alpha=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            weight = layer.lora_B["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=g))
    return model


CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    from torch import nn
    import loracore.adapters as adapters
    from loracore.surgery import inject, lora_layers
    folder, seed, stage = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if stage == "mid-weights":  # half the weights file written
        def half(tensors, filename, metadata=None):
            open(filename, "wb").write(b"x" * 1000); die()
        adapters.save_file = half
    elif stage == "after-weights":  # the weights file complete, the config not yet written
        real = adapters.save_file
        def then_die(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata); die()
        adapters.save_file = then_die
    else:  # one of the swap's stages
        import loracore.atomic as atomic
        atomic._stage = lambda s: die() if s == stage else None
""") + textwrap.dedent(inspect.getsource(sigkill_model)) + "adapters.save_adapter(sigkill_model(seed), folder)\n"
STAGES = ["mid-weights", "after-weights", *atomic.STAGES]


def B_of(model: nn.Module) -> list[torch.Tensor]:
    return [layer.lora_B["default"].weight.detach().clone() for layer in lora_layers(model).values()]


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_during_save_leaves_the_old_or_the_new_adapter(tmp_path, stage):
    folder = tmp_path / "ad"
    save_adapter(sigkill_model(1), folder)
    child = subprocess.run([sys.executable, "-c", CHILD, str(folder), "2", stage],
                           env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])},
                           capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    torch.manual_seed(0)
    bare = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    got = B_of(load_adapter(bare, folder))  # recovers an interrupted swap if the folder is gone
    is_old = all(map(torch.equal, got, B_of(sigkill_model(1))))
    is_new = all(map(torch.equal, got, B_of(sigkill_model(2))))
    assert is_old or is_new
    if stage in ("mid-weights", "after-weights", "new-complete"):
        assert is_old  # the new adapter was not complete, or not yet swapped in
    if stage in ("old-aside", "new-in-place"):
        assert is_new
    save_adapter(sigkill_model(3), folder)  # the next save removes every leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_save_interrupted_between_the_renames_puts_the_old_folder_back(trained, saved, tmp_path,
                                                                      monkeypatch):
    files = tree(tmp_path)
    randomize_B(trained, seed=7)

    def interrupt(stage: str) -> None:
        if stage == "old-aside":
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_stage", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(trained, saved)
    assert tree(tmp_path) == files
