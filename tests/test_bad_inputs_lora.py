"""Hostile inputs and faults against the LoRA layer, model surgery and adapter files.

Every case asserts two things: (a) the error names its cause (the function, the module or the
file, and what to do), and (b) nothing changed: the model (module objects in the same places,
state_dict bit for bit, requires_grad flags, adapters, active and merged ones, the
requires_grad record inject keeps) and the files (every byte under the test's folder, hidden
leftovers included). Faults are injected half-way (a method that raises on its Nth call, a
process that SIGKILLs itself at a chosen stage of a save).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import loracore.adapters as adapters
import loracore.atomic as atomic
import loracore.surgery as surgery
from loracore.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from loracore.layer import LoRALinear
from loracore.surgery import (delete_adapter, inject, lora_layers, merge_adapters, remove_lora,
                              set_adapter, unmerge_adapters)

Q0 = "model.layers.0.self_attn.q_proj"


# ---- helpers ------------------------------------------------------------------------------
def tiny_qwen2(tied: bool = True) -> nn.Module:
    """A seeded 2-layer Qwen2 (hidden 64); tie_word_embeddings as in the real tiny-qwen2."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return Qwen2ForCausalLM(cfg).eval()


def randomize_B(model: nn.Module, std: float = 0.1, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for lin in layer.lora_B.values():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)


def state(model: nn.Module) -> dict:
    """Everything an operation could change, copied."""
    return {
        "modules": {n: (type(m), id(m)) for n, m in model.named_modules()},
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "lora": {n: (list(m.lora_A), list(m.active_adapters), list(m.merged_adapters), dict(m.r),
                     dict(m.lora_alpha), dict(m.scaling), m.disabled,
                     None if m._unmerged_weight is None else m._unmerged_weight.clone())
                 for n, m in lora_layers(model).items()},
        "record": copy.deepcopy(model.__dict__.get("_loracore_requires_grad", "absent")),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = state(model)
    assert after["modules"] == before["modules"]
    assert after["grad"] == before["grad"]
    assert after["record"] == before["record"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, t in before["tensors"].items():
        assert after["tensors"][k].dtype == t.dtype and torch.equal(after["tensors"][k], t), k
    assert after["lora"].keys() == before["lora"].keys()
    for n, old in before["lora"].items():
        new = after["lora"][n]
        assert new[:-1] == old[:-1], n
        assert (new[-1] is None) == (old[-1] is None) and (old[-1] is None or torch.equal(new[-1], old[-1]))


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) -> SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def fail_on_call(monkeypatch, owner, name: str, n: int, exc: BaseException | None = None) -> None:
    """Make ``owner.name`` raise on its ``n``-th call (the earlier calls run normally)."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc or RuntimeError(f"injected failure in {name} (call {n})")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


@pytest.fixture(scope="module")
def _base() -> nn.Module:
    return tiny_qwen2()


@pytest.fixture
def base(_base) -> nn.Module:
    return copy.deepcopy(_base)


@pytest.fixture
def trained(_base) -> nn.Module:
    """A copy of the base with a q/v adapter whose B is non-zero (``base`` stays bare)."""
    model = inject(copy.deepcopy(_base), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    randomize_B(model)
    return model


@pytest.fixture
def saved(trained, tmp_path) -> Path:
    return save_adapter(trained, tmp_path / "ad")


# ---- inject: bad arguments refused before anything changes --------------------------------
BAD_INJECT = [
    (dict(r=0), ValueError, "inject: r must be a positive int"),
    (dict(r=-1), ValueError, "inject: r must be a positive int"),
    (dict(r=2.5), ValueError, "inject: r must be a positive int"),
    (dict(r=True), ValueError, "inject: r must be a positive int"),
    (dict(lora_alpha=0), ValueError, "inject: lora_alpha=0 .*never learn"),
    (dict(lora_alpha=0.0), ValueError, "inject: lora_alpha=0 .*never learn"),
    (dict(lora_alpha=float("nan")), ValueError, "inject: lora_alpha must be a finite number"),
    (dict(lora_alpha="8"), ValueError, "inject: lora_alpha must be a finite number"),
    (dict(lora_dropout=1.0), ValueError, r"inject: lora_dropout must be a number in \[0, 1\)"),
    (dict(lora_dropout=-0.1), ValueError, r"inject: lora_dropout must be a number in \[0, 1\)"),
    (dict(adapter_name=""), ValueError, "inject: adapter name must be a non-empty string"),
    (dict(adapter_name="a.b"), ValueError, "inject: adapter name must be .*without dots"),
    (dict(adapter_name=None), ValueError, "inject: adapter name must be a non-empty string"),
    (dict(target_modules=None), TypeError, "inject: target_modules must be a list of layer names"),
    (dict(target_modules=42), TypeError, "inject: target_modules must be a list of layer names"),
    (dict(target_modules=[]), ValueError, "inject: target_modules is empty"),
    (dict(target_modules=""), ValueError, "inject: target_modules is an empty string"),
    (dict(target_modules=["q_proj", 3]), TypeError, "inject: every entry of target_modules"),
    (dict(target_modules="q_proj("), ValueError,
     r"inject: target_modules 'q_proj\(' is not a valid regular expression.*\['q_proj'\]"),
    (dict(target_modules="q_proj"), ValueError,
     r"single string is read as a regex over full module names.*\['q_proj'\]"),
    (dict(target_modules=["nope"]), ValueError, r"match no linear layer.*'q_proj'"),
]


@pytest.mark.parametrize("bad, exc, message", BAD_INJECT, ids=[str(b) for b, _, _ in BAD_INJECT])
def test_inject_refuses_bad_arguments_and_changes_nothing(base, bad, exc, message):
    kwargs = dict(target_modules=["q_proj"], r=4, lora_alpha=8) | bad
    before = state(base)
    with pytest.raises(exc, match=message):
        inject(base, **kwargs)
    assert_unchanged(base, before)  # in particular: nothing frozen, no record left
    assert all(p.requires_grad for p in base.parameters())


def test_second_inject_with_overlapping_targets_wraps_nothing(trained):
    before = state(trained)
    with pytest.raises(ValueError, match=rf"inject: modules \[.*'{Q0}'.*\] already have an adapter "
                                         r"named 'default'.*delete_adapter"):
        inject(trained, ["q_proj", "k_proj"], r=2, lora_alpha=2)
    assert_unchanged(trained, before)  # k_proj was not wrapped
    inject(trained, ["q_proj", "k_proj"], r=2, lora_alpha=2, adapter_name="other")  # the fix works


@pytest.mark.parametrize("n", [1, 3, 6])
def test_inject_failing_half_way_rolls_back(base, monkeypatch, n):
    before = state(base)
    fail_on_call(monkeypatch, surgery, "_replace", n)
    with pytest.raises(RuntimeError, match="injected failure"):
        inject(base, "all-linear", r=4, lora_alpha=8)
    assert_unchanged(base, before)
    assert not lora_layers(base) and not hasattr(base, "_loracore_requires_grad")


def test_inject_interrupted_on_a_model_with_adapters_rolls_back(trained, monkeypatch):
    before = state(trained)
    fail_on_call(monkeypatch, LoRALinear, "add_adapter", 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        inject(trained, ["q_proj", "v_proj", "k_proj"], r=2, lora_alpha=2, adapter_name="b")
    assert_unchanged(trained, before)
    monkeypatch.undo()
    inject(trained, ["q_proj", "v_proj", "k_proj"], r=2, lora_alpha=2, adapter_name="b")  # retry works


# ---- the layer ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 15), (3, 17), (16, 3), ()])
def test_forward_with_the_wrong_width_names_in_features_and_the_shape(shape):
    layer = LoRALinear(nn.Linear(16, 12), r=4, lora_alpha=8)
    with pytest.raises(ValueError, match=rf"LoRALinear.forward: input of shape "
                                         rf"{re.escape(str(tuple(shape)))}.*in_features=16"):
        layer(torch.zeros(shape))


def test_add_adapter_lora_alpha_zero_is_refused_with_the_reason():
    layer = LoRALinear(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="LoRALinear.add_adapter: lora_alpha=0.*exactly zero"):
        layer.add_adapter("a", r=2, lora_alpha=0)
    assert not layer.lora_A and not layer.r


# ---- set_adapter / delete_adapter / remove_lora ---------------------------------------------
@pytest.mark.parametrize("names, exc, message", [
    ("defualt", KeyError, r"set_adapter: no adapter named \['defualt'\].*'default'"),
    (["default", "nope"], KeyError, r"set_adapter: no adapter named \['nope'\]"),
    (None, TypeError, "set_adapter: adapter names must be a string or a list of strings"),
    ([1], TypeError, "set_adapter: adapter names must be a string or a list of strings"),
])
def test_set_adapter_refusals(trained, names, exc, message):
    before = state(trained)
    with pytest.raises(exc, match=message):
        set_adapter(trained, names)
    assert_unchanged(trained, before)


def test_operations_on_a_model_without_lora_say_inject_first(base):
    before = state(base)
    for op in (lambda: set_adapter(base, "default"), lambda: merge_adapters(base),
               lambda: unmerge_adapters(base), lambda: delete_adapter(base, "default")):
        with pytest.raises(ValueError, match="has no LoRA layers; call inject"):
            op()
    assert_unchanged(base, before)


def test_delete_adapter_merged_on_one_layer_deletes_nowhere(trained):
    lora_layers(trained)["model.layers.1.self_attn.v_proj"].merge()
    before = state(trained)
    with pytest.raises(RuntimeError, match=r"delete_adapter: adapter 'default' is merged into "
                                           r"\['model.layers.1.self_attn.v_proj'\].*unmerge"):
        delete_adapter(trained, "default")
    assert_unchanged(trained, before)


@pytest.mark.parametrize("name, exc, message", [
    ("nope", KeyError, r"delete_adapter: no adapter named \['nope'\]"),
    (None, TypeError, "delete_adapter: the adapter name must be a string"),
])
def test_delete_adapter_refusals(trained, name, exc, message):
    before = state(trained)
    with pytest.raises(exc, match=message):
        delete_adapter(trained, name)
    assert_unchanged(trained, before)


def test_remove_lora_failing_half_way_rolls_back(trained, monkeypatch):
    merge_adapters(trained)
    before = state(trained)
    fail_on_call(monkeypatch, surgery, "_replace", 3)
    with pytest.raises(RuntimeError, match="injected failure"):
        remove_lora(trained)
    assert_unchanged(trained, before)  # still wrapped, still merged, same bits


# ---- merge_adapters -----------------------------------------------------------------------
def test_merge_unknown_name_is_refused(trained):
    before = state(trained)
    with pytest.raises(KeyError, match=r"merge_adapters: no adapter named \['defualt'\].*'default'"):
        merge_adapters(trained, "defualt")
    with pytest.raises(TypeError, match="merge_adapters: adapter names must be"):
        merge_adapters(trained, [None])
    assert_unchanged(trained, before)


def test_merge_into_a_tied_output_head_is_refused(base):
    inject(base, ["q_proj", "lm_head"], r=4, lora_alpha=8)
    randomize_B(base)
    before = state(base)
    with pytest.raises(ValueError, match=r"merge_adapters: the weight of module 'lm_head' is tied to "
                                         r"\['model.embed_tokens.weight'\].*untie"):
        merge_adapters(base)
    assert_unchanged(base, before)  # q_proj not merged either, embeddings untouched


def test_merge_into_an_untied_output_head_works():
    model = inject(tiny_qwen2(tied=False), ["lm_head"], r=4, lora_alpha=8)
    randomize_B(model)
    emb = model.model.embed_tokens.weight.detach().clone()
    merge_adapters(model)
    assert lora_layers(model)["lm_head"].merged and torch.equal(model.model.embed_tokens.weight, emb)


def test_merge_twice_is_refused_naming_the_module(trained):
    merge_adapters(trained)
    before = state(trained)
    with pytest.raises(RuntimeError, match=rf"merge_adapters: adapter\(s\) \['default'\] already "
                                           rf"merged into module '{Q0}'"):
        merge_adapters(trained)
    assert_unchanged(trained, before)


def test_merge_into_a_quantized_base_is_refused_naming_the_module():
    from loracore.qlora import Linear4bit
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    model[1] = Linear4bit.from_linear(model[1])
    inject(model, ["0", "1"], r=2, lora_alpha=4)
    before = state(model)
    with pytest.raises(TypeError, match="merge_adapters: module '1' has a Linear4bit base"):
        merge_adapters(model)
    assert_unchanged(model, before)


def test_merge_non_finite_on_the_last_layer_merges_nothing(trained):
    last = list(lora_layers(trained).values())[-1]
    with torch.no_grad():
        last.lora_A["default"].weight.fill_(1e30)
        last.lora_B["default"].weight.fill_(1e30)
    before = state(trained)
    with pytest.raises(ValueError, match=r"merge_adapters: module 'model.layers.1.self_attn.v_proj'"
                                         r".*non-finite.*nothing was merged"):
        merge_adapters(trained)
    assert_unchanged(trained, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3])
def test_merge_failing_half_way_rolls_back_bit_for_bit(base, monkeypatch, dtype, n):
    """A second adapter merged on top of a first one, failing on the n-th layer: the first
    stays merged with exactly its bits, the second is merged nowhere."""
    base.to(dtype)
    inject(base, ["q_proj", "v_proj"], r=4, lora_alpha=8, adapter_name="a")
    inject(base, ["q_proj", "v_proj"], r=2, lora_alpha=4, adapter_name="b")
    randomize_B(base)
    merge_adapters(base, "a")
    before = state(base)
    fail_on_call(monkeypatch, LoRALinear, "merge", n)
    with pytest.raises(RuntimeError, match="injected failure"):
        merge_adapters(base, "b")
    assert_unchanged(base, before)


def test_unmerge_failing_half_way_rolls_back(trained, monkeypatch):
    merge_adapters(trained)
    before = state(trained)
    fail_on_call(monkeypatch, LoRALinear, "unmerge", 3)
    with pytest.raises(RuntimeError, match="injected failure"):
        unmerge_adapters(trained)
    assert_unchanged(trained, before)


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
    files, before = tree(tmp_path), state(base)
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
    files, before = tree(tmp_path), state(base)
    with pytest.raises(ValueError, match=f"load_adapter: .*{message}"):
        load_adapter(base, saved)
    assert_unchanged(base, before)
    assert tree(tmp_path) == files


def test_load_alpha_zero_from_a_peft_config_is_refused(base, saved, tmp_path):
    """A PEFT-written folder (no loracore record) whose config says lora_alpha=0."""
    rewrite_weights(saved, lambda t: None, keep_metadata=False)
    _config(lambda c: json.dumps(c | {"lora_alpha": 0}).encode())(saved)
    files, before = tree(tmp_path), state(base)
    with pytest.raises(ValueError, match=f"load_adapter: .*{CONFIG_NAME} gives module .*lora_alpha=0"):
        load_adapter(base, saved)
    assert_unchanged(base, before)
    assert tree(tmp_path) == files


@pytest.mark.parametrize("name", ["other.safetensors", "README.md", "notes.json"])
def test_load_given_another_file_in_the_folder_refuses_it(base, saved, tmp_path, name):
    """Given a file, load_adapter used to load the folder's adapter_model.safetensors instead."""
    other = saved / name
    other.write_bytes(b"something else the user keeps here")
    files, before = tree(tmp_path), state(base)
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
    before = state(base)
    with pytest.raises(ValueError, match="load_adapter: adapter name must be a non-empty string"):
        load_adapter(base, saved, adapter_name=name)
    assert_unchanged(base, before)


def test_load_where_one_module_already_has_the_name_injects_nowhere(base, saved):
    inject(base, ["model.layers.1.self_attn.v_proj"], r=2, lora_alpha=2)
    before = state(base)
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
    before = state(base)
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
