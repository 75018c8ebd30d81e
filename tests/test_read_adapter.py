"""read_adapter (loracore/adapter_file.py), check_base and inject_modules: reading an adapter
file without a model, checking it against one, and wrapping exactly the layers it names.

All on the tiny random Qwen2 (milliseconds per model)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

import loracore.adapters as adapters
import loracore.layer as layer_mod
import loracore.surgery as surgery
from conftest import with_adapter
from loracore.adapter_file import FORMAT, AdapterFile, read_adapter, refuse_or_warn
from loracore.adapters import CONFIG_NAME, WEIGHTS_NAME, check_base, load_adapter, save_adapter
from loracore.fingerprint import foreign_adapters, forget_foreign
from loracore.layer import LoRALinear, check_adapter_name
from loracore.surgery import delete_adapter, inject, inject_modules, lora_layers, remove_lora

Q0 = "model.layers.0.self_attn.q_proj"


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def rewrite_record(folder, edit) -> None:
    """Rewrite loracore's header record through ``edit(record) -> record`` (tensors kept)."""
    path = folder / WEIGHTS_NAME
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
    tensors = safetensors.torch.load_file(str(path))
    metadata["loracore"] = json.dumps(edit(json.loads(metadata["loracore"])))
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def state(model: nn.Module) -> dict:
    return {"modules": [(n, type(m).__name__) for n, m in model.named_modules()],
            "tensors": {k: v.clone() for k, v in model.state_dict().items()},
            "grad": {n: p.requires_grad for n, p in model.named_parameters()}}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = state(model)
    assert after["modules"] == before["modules"] and after["grad"] == before["grad"]
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][k], before["tensors"][k]) for k in before["tensors"])


# ---- read_adapter: what it returns --------------------------------------------------------
def test_read_returns_the_saved_factors_scalings_and_record_and_changes_no_file(tiny, tmp_path):
    model, _ = tiny
    trained = with_adapter(model, ["q_proj", "v_proj"], r=4, alpha=8)
    folder = save_adapter(trained, tmp_path / "ad")
    before = files(folder)
    adapter = read_adapter(folder)
    assert files(folder) == before
    assert isinstance(adapter, AdapterFile) and adapter.path == folder and adapter.format == FORMAT
    assert sorted(adapter.modules) == sorted(lora_layers(trained))
    for name, lay in lora_layers(trained).items():
        m = adapter.modules[name]
        assert torch.equal(m.lora_A, lay.lora_A["default"].weight)
        assert torch.equal(m.lora_B, lay.lora_B["default"].weight)
        assert (m.r, m.lora_alpha, m.scaling) == (4, 8, 2.0) and m.lora_magnitude_vector is None
    assert (adapter.r, adapter.lora_alpha, adapter.use_rslora, adapter.use_dora) == (4, 8, False, False)
    assert adapter.rank_pattern == {} and adapter.alpha_pattern == {}
    assert adapter.base_fingerprint["targets"][Q0] == [64, 64]
    assert adapter.config == json.loads((folder / CONFIG_NAME).read_text())
    assert read_adapter(folder / WEIGHTS_NAME).modules.keys() == adapter.modules.keys()  # a file too


def test_read_rslora_gives_alpha_over_sqrt_r(tiny, tmp_path):
    model, _ = tiny
    folder = save_adapter(with_adapter(model, ["q_proj"], r=16, alpha=8, use_rslora=True), tmp_path / "rs")
    adapter = read_adapter(folder)
    assert adapter.use_rslora and (adapter.r, adapter.lora_alpha) == (16, 8)
    assert {m.scaling for m in adapter.modules.values()} == {8 / math.sqrt(16)}


def test_read_mixed_ranks_gives_each_module_its_own(tiny, tmp_path):
    model, _ = tiny
    trained = with_adapter(model, ["q_proj", "k_proj"], r=8, alpha=16)
    inject(trained, ["v_proj"], r=2, lora_alpha=6)  # the same adapter name, another rank
    folder = save_adapter(trained, tmp_path / "mixed")
    config = json.loads((folder / CONFIG_NAME).read_text())
    adapter = read_adapter(folder)
    v0 = "model.layers.0.self_attn.v_proj"
    assert (adapter.modules[Q0].r, adapter.modules[Q0].scaling) == (8, 2.0)
    assert (adapter.modules[v0].r, adapter.modules[v0].lora_alpha, adapter.modules[v0].scaling) == (2, 6, 3.0)
    assert (adapter.r, adapter.lora_alpha) == (config["r"], config["lora_alpha"]) == (8, 16)
    assert adapter.rank_pattern == config["rank_pattern"] and v0 in adapter.rank_pattern
    assert adapter.alpha_pattern == config["alpha_pattern"] and v0 in adapter.alpha_pattern


def test_read_dora_returns_the_magnitudes(tiny, tmp_path):
    model, _ = tiny
    trained = with_adapter(model, ["q_proj"], r=4, alpha=8, use_dora=True)
    adapter = read_adapter(save_adapter(trained, tmp_path / "dora"))
    assert adapter.use_dora
    for name, lay in lora_layers(trained).items():
        assert torch.equal(adapter.modules[name].lora_magnitude_vector,
                           lay.lora_magnitude_vector["default"].weight)


def test_read_a_peft_file_has_no_loracore_record(tiny, tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = tiny
    pm = peft.get_peft_model(copy.deepcopy(model),
                             peft.LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "peft")
    adapter = read_adapter(tmp_path / "peft")
    assert adapter.format is None and adapter.base_fingerprint is None
    assert sorted(adapter.modules) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert {m.scaling for m in adapter.modules.values()} == {16 / 2}
    wanted = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert torch.equal(adapter.modules[Q0].lora_A, wanted)


# ---- read_adapter: the record's format ----------------------------------------------------
def test_saved_record_carries_format_1(tiny, tmp_path):
    model, _ = tiny
    folder = save_adapter(with_adapter(model, ["q_proj"], 4, 8), tmp_path / "ad")
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
        assert json.loads(f.metadata()["loracore"])["format"] == FORMAT == 1


def test_record_without_a_format_from_an_earlier_loracore_reads_as_format_1(tiny, tmp_path):
    model, _ = tiny
    trained = with_adapter(model, ["q_proj"], 4, 8)
    folder = save_adapter(trained, tmp_path / "ad")
    rewrite_record(folder, lambda rec: {k: v for k, v in rec.items() if k != "format"})
    assert read_adapter(folder).format == 1
    ids = torch.randint(0, 259, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_adapter(copy.deepcopy(model), folder)(ids).logits, trained(ids).logits)


@pytest.mark.parametrize("fmt", [2, "1", None])
def test_unknown_record_format_is_refused_naming_file_and_version(tiny, tmp_path, fmt):
    model, _ = tiny
    folder = save_adapter(with_adapter(model, ["q_proj"], 4, 8), tmp_path / "ad")
    rewrite_record(folder, lambda rec: rec | {"format": fmt})
    with pytest.raises(ValueError, match=rf"read_adapter: the loracore record in .*{WEIGHTS_NAME} "
                                         rf"has format {fmt!r}; this loracore reads format 1"):
        read_adapter(folder)
    target = copy.deepcopy(model)
    before = state(target)
    with pytest.raises(ValueError, match="load_adapter: .*newer loracore"):
        load_adapter(target, folder)
    assert_unchanged(target, before)


def test_record_that_is_not_an_object_is_refused(tiny, tmp_path):
    model, _ = tiny
    folder = save_adapter(with_adapter(model, ["q_proj"], 4, 8), tmp_path / "ad")
    rewrite_record(folder, lambda rec: [rec])
    with pytest.raises(ValueError, match="loracore record in .* is a JSON list, not an object"):
        read_adapter(folder)


# ---- read_adapter: refusals ---------------------------------------------------------------
def test_read_refusals_name_the_problem_and_the_caller(tiny, tmp_path):
    model, _ = tiny
    with pytest.raises(FileNotFoundError, match="read_adapter: no adapter folder at"):
        read_adapter(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="AdapterRegistry: no adapter folder at"):
        read_adapter(tmp_path / "nowhere", caller="AdapterRegistry")
    folder = save_adapter(with_adapter(model, ["q_proj"], 4, 8), tmp_path / "ad")
    tensors = safetensors.torch.load_file(str(folder / WEIGHTS_NAME))
    key = f"base_model.model.{Q0}.lora_B.weight"
    tensors[key] = tensors[key][:, :3].contiguous()  # B of rank 3 for an A of rank 4
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
        metadata = f.metadata()
    safetensors.torch.save_file(tensors, str(folder / WEIGHTS_NAME), metadata=metadata)
    with pytest.raises(ValueError, match=rf"read_adapter: module '{Q0}': lora_A .*\(4, 64\) \(rank 4\) "
                                         rf"but lora_B has shape \(64, 3\).*share the rank"):
        read_adapter(folder)


def test_read_config_mismatch_refused_when_strict_else_warned(tiny, tmp_path):
    model, _ = tiny
    folder = save_adapter(with_adapter(model, ["q_proj"], 4, 8), tmp_path / "ad")
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps(config | {"lora_alpha": 16}))
    with pytest.raises(ValueError, match="(?s)read_adapter: .*lora_alpha: the weights were saved with 8"):
        read_adapter(folder)
    with pytest.warns(UserWarning, match="does not match its weights file"):
        adapter = read_adapter(folder, strict=False)
    assert adapter.modules[Q0].scaling == 16 / 4  # the config as it is


def test_refuse_or_warn_lists_every_problem():
    refuse_or_warn([], "nothing", "advice", strict=True)  # no problem: no error, no warning
    with pytest.raises(ValueError, match=r"^here: two problems:\n  - one\n  - two\nDo this\.$"):
        refuse_or_warn(["one", "two"], "here: two problems", "Do this.", strict=True)
    with pytest.warns(UserWarning, match=r"^here: two problems:\n  - one\n  - two$"):
        refuse_or_warn(["one", "two"], "here: two problems", "Do this.", strict=False)


# ---- check_base ---------------------------------------------------------------------------
def test_check_base_accepts_the_base_and_changes_nothing(tiny, tmp_path):
    model, _ = tiny
    adapter = read_adapter(save_adapter(with_adapter(model, ["q_proj"], 4, 8), tmp_path / "ad"))
    before = state(model)
    assert check_base(model, adapter) == []
    assert_unchanged(model, before)


def test_check_base_refuses_another_base_or_warns_and_says_what_differs(tiny, tmp_path):
    model, _ = tiny
    adapter = read_adapter(save_adapter(with_adapter(model, ["q_proj"], 4, 8), tmp_path / "ad"))
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.mul_(1.01)
    with pytest.raises(ValueError, match="(?s)check_base: .*different base model.*hash differently"):
        check_base(other, adapter)
    with pytest.warns(UserWarning, match="different base model"):
        problems = check_base(other, adapter, strict=False)
    assert len(problems) == 1 and "hash differently" in problems[0]


def test_check_base_refuses_missing_or_misshapen_modules(tiny, tmp_path):
    model, _ = tiny
    adapter = read_adapter(save_adapter(with_adapter(model, ["q_proj"], 4, 8), tmp_path / "ad"))
    short = copy.deepcopy(model)
    del short.model.layers[1]
    with pytest.raises(ValueError, match="check_base: .*'model.layers.1.self_attn.q_proj', which "
                                         "Qwen2ForCausalLM does not have"):
        check_base(short, adapter)
    narrow = copy.deepcopy(model)
    narrow.model.layers[0].self_attn.q_proj = nn.Linear(32, 64)
    with pytest.raises(ValueError, match=rf"module '{Q0}': lora_A in the file has shape \(4, 64\), "
                                         r"the model's layer needs \(4, 32\)"):
        check_base(narrow, adapter)
    wrapped = inject(copy.deepcopy(model), ["q_proj"], 2, 2)  # a LoRALinear's own base layer
    inner = read_adapter(adapter.path)
    inner = AdapterFile(inner.path, inner.config, {f"{Q0}.base_layer": inner.modules[Q0]}, None, 1)
    with pytest.raises(ValueError, match="base_layer'.*does not have \\(or is not linear\\)"):
        check_base(wrapped, inner)


# ---- load_adapter: the name is checked once -----------------------------------------------
def test_one_load_checks_the_adapter_name_once(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    folder = save_adapter(with_adapter(model, ["q_proj", "v_proj", "down_proj"], 4, 8), tmp_path / "ad")
    calls = []

    def counting(real):
        return lambda *args, **kwargs: calls.append(args[1]) or real(*args, **kwargs)

    for module in (adapters, layer_mod):
        monkeypatch.setattr(module, "check_adapter_name", counting(module.check_adapter_name))
    for module in (layer_mod, surgery):
        monkeypatch.setattr(module, "check_adapter_args", counting(module.check_adapter_args))
    load_adapter(model, folder, "task")
    assert calls == ["task"] and len(lora_layers(model)) == 6


def test_check_adapter_name_refuses_with_the_callers_name():
    for bad in ("", "a.b", None, 3):
        with pytest.raises(ValueError, match="here: adapter name must be a non-empty string without dots"):
            check_adapter_name("here", bad)
    check_adapter_name("here", "fine-name_2")


def test_add_adapter_still_checks_its_arguments_unless_told_they_were_checked():
    lay = LoRALinear(nn.Linear(8, 6))
    with pytest.raises(ValueError, match="LoRALinear.add_adapter: adapter name must be"):
        lay.add_adapter("a.b", 2, 2)
    with pytest.raises(ValueError, match="LoRALinear.add_adapter: r must be a positive int"):
        lay.add_adapter("a", 0, 2)
    assert not lay.lora_A
    lay.add_adapter("a", 2, 4, checked=True)
    assert lay.scaling["a"] == 2.0 and lay.active_adapters == ["a"]


# ---- inject_modules -----------------------------------------------------------------------
class Nested(nn.Module):
    """Two linear layers whose full names end alike ("proj", "inner.proj"): a list of layer
    names picks both, exact names pick one."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.inner = nn.Module()
        self.inner.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.proj(self.proj(x))


def test_inject_modules_wraps_exactly_the_named_layers():
    assert sorted(lora_layers(inject(Nested(), ["proj"], 2, 2))) == ["inner.proj", "proj"]
    model = inject_modules(Nested(), ["proj"], 2, 4, adapter_name="x")
    assert list(lora_layers(model)) == ["proj"]
    lay = model.proj
    assert (lay.r, lay.lora_alpha, lay.active_adapters) == ({"x": 2}, {"x": 4}, ["x"])
    assert not model.inner.proj.weight.requires_grad and lay.lora_A["x"].weight.requires_grad


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(module_names=[]), TypeError, "inject_modules: module_names must be a non-empty list"),
    (dict(module_names="proj"), TypeError, "inject_modules: module_names must be a non-empty list"),
    (dict(module_names=["nope"]), ValueError, r"inject_modules: \['nope'\] are not linear layers of Nested"),
    (dict(module_names=["inner"]), ValueError, r"inject_modules: \['inner'\] are not linear layers"),
    (dict(adapter_name="a.b"), ValueError, "inject_modules: adapter name must be"),
    (dict(r=0), ValueError, "inject_modules: r must be a positive int"),
    (dict(use_dora="yes"), TypeError, "inject_modules: use_dora must be True or False"),
])
def test_inject_modules_refuses_bad_input_and_changes_nothing(kwargs, exc, message):
    model = Nested()
    before = state(model)
    args = dict(module_names=["proj"], r=2, lora_alpha=2) | kwargs
    with pytest.raises(exc, match=message):
        inject_modules(model, **args)
    assert_unchanged(model, before)


def test_inject_modules_failing_half_way_rolls_back(monkeypatch):
    model = Nested()
    before = state(model)
    real, calls = surgery._replace, []

    def failing(*args):
        calls.append(args[1])
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        real(*args)

    monkeypatch.setattr(surgery, "_replace", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        inject_modules(model, ["proj", "inner.proj"], 2, 2)
    assert calls == ["proj", "inner.proj"]  # the first layer had been swapped in
    assert_unchanged(model, before)
    assert not lora_layers(model) and not hasattr(model, "_loracore_requires_grad")


# ---- fingerprint.forget_foreign -----------------------------------------------------------
def test_forget_foreign_forgets_one_adapter_or_all(tiny, tmp_path):
    model, _ = tiny
    folder = save_adapter(with_adapter(model, ["q_proj"], 4, 8), tmp_path / "ad")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.mul_(1.01)
    with pytest.warns(UserWarning):
        load_adapter(other, folder, "a", strict=False)
    with pytest.warns(UserWarning):
        load_adapter(other, folder, "b", strict=False)
    assert sorted(foreign_adapters(other)) == ["a", "b"]
    forget_foreign(other, "a")
    assert sorted(foreign_adapters(other)) == ["b"]
    forget_foreign(other, "never-loaded")  # nothing to forget: no error
    forget_foreign(other)
    assert foreign_adapters(other) == {}
    with pytest.warns(UserWarning):
        load_adapter(other, folder, "c", strict=False)
    delete_adapter(other, "c")  # surgery forgets through forget_foreign
    assert "c" not in other.__dict__.get("_loracore_foreign_adapters", {})
    with pytest.warns(UserWarning):
        load_adapter(other, folder, "d", strict=False)
    remove_lora(other)
    assert "_loracore_foreign_adapters" not in other.__dict__
