"""PiSSA and LoftQ initialisations (``inject(init_lora_weights="pissa" | "loftq")``).

Against PEFT on the tiny Qwen2: PiSSA bit for bit (A, B, the residual base, logits); LoftQ too,
running PEFT's own ``loftq_init`` on the CPU (PEFT sends the weight to "cuda" unconditionally, so
the test maps that device to the CPU; bitsandbytes' NF4 runs there, blocksize 64 without double
quantization, the same code book loracore's ``nf4`` reproduces byte for byte). Then what each
changes in the base, what saving does with it, and the refusals, all or nothing.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch

from conftest import assert_unchanged, fail_on_call, snapshot
from loracore import surgery
from loracore.adapters import load_adapter, save_adapter
from loracore.lora_init import loftq_init, pissa_init, relative_error
from loracore.nf4 import dequantize_nf4, quantize_nf4
from loracore.qlora import Linear4bit, quantize_model
from loracore.surgery import changed_bases, delete_adapter, inject, lora_layers, remove_lora

TARGETS = ["q_proj", "v_proj", "down_proj"]


def base():
    from loracore.models import load_base_model
    return load_base_model("tiny-qwen2", verbose=False)[0]


def ids(model):
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def effective(layer, name="default") -> torch.Tensor:
    """The layer's starting weight: base + scaling·B·A, (out, in)."""
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.base_layer.weight.detach() + layer.scaling[name] * (b @ a).detach()


def train_a_little(model, seed=3, std=0.02):
    """Move every A and B away from their initial values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for d in (layer.lora_A, layer.lora_B):
                w = d["default"].weight
                w.add_(torch.randn(w.shape, generator=g) * std)


# ---- PiSSA ---------------------------------------------------------------------------------
def test_pissa_keeps_the_weight_and_takes_the_principal_directions():
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    a, b, res = pissa_init(w, 4, scaling=2.0)
    assert a.shape == (4, 32) and b.shape == (48, 4)
    torch.testing.assert_close(res + 2.0 * b @ a, w, atol=1e-5, rtol=0)
    s = torch.linalg.svdvals(w)
    torch.testing.assert_close(torch.linalg.svdvals(2.0 * b @ a)[:4], s[:4], atol=1e-4, rtol=0)
    # the residual holds exactly the other singular values
    torch.testing.assert_close(torch.linalg.svdvals(res)[:28], s[4:], atol=1e-4, rtol=0)


def test_pissa_equals_peft():
    from peft import LoraConfig, get_peft_model
    ours, theirs = base(), base()
    x = ids(ours)
    start = logits(ours, x)
    inject(ours, TARGETS, r=4, lora_alpha=8, init_lora_weights="pissa")  # scaling 2
    peft_model = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                   init_lora_weights="pissa"))
    layers = lora_layers(ours)
    assert len(layers) == 6
    for name, layer in layers.items():
        other = peft_model.base_model.model.get_submodule(name)
        for what in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, what)["default"].weight,
                                       getattr(other, what)["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.base_layer.weight, other.base_layer.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(ours, x), logits(peft_model, x), atol=1e-5, rtol=0)
    # and the model starts where the base was (up to float rounding), though its base changed
    torch.testing.assert_close(logits(ours, x), start, atol=1e-4, rtol=0)
    w0 = base().get_submodule("model.layers.0.self_attn.q_proj").weight
    assert (layers["model.layers.0.self_attn.q_proj"].base_layer.weight - w0).abs().max() > 0.01


def test_fast_pissa_equals_peft_given_the_same_random_draws(monkeypatch):
    """PiSSA by randomized SVD ("pissa_niter_K"). The two libraries draw other random numbers in between
    (A's Kaiming init), so each randomized SVD is made to start from the same seed."""
    import peft.tuners.lora.layer as peft_layer
    from peft import LoraConfig, get_peft_model
    real = torch.svd_lowrank

    def seeded(*args, **kwargs):
        with torch.random.fork_rng():
            torch.manual_seed(7)
            return real(*args, **kwargs)
    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    monkeypatch.setattr(peft_layer, "svd_lowrank", seeded)
    ours, theirs, exact = base(), base(), base()
    inject(ours, TARGETS, r=4, lora_alpha=8, init_lora_weights="pissa_niter_2")
    peft_model = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                   init_lora_weights="pissa_niter_2"))
    inject(exact, TARGETS, r=4, lora_alpha=8, init_lora_weights="pissa")
    x = ids(ours)
    for name, layer in lora_layers(ours).items():
        other = peft_model.base_model.model.get_submodule(name)
        for what in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, what)["default"].weight,
                                       getattr(other, what)["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.base_layer.weight, other.base_layer.weight, atol=1e-6, rtol=0)
        # an estimate: not the exact top-4 (the tiny model's spectrum is flat), yet the same weight
        assert not torch.allclose(layer.base_layer.weight, lora_layers(exact)[name].base_layer.weight,
                                  atol=1e-3)
        w = base().get_submodule(name).weight
        torch.testing.assert_close(effective(layer), w, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(ours, x), logits(peft_model, x), atol=1e-5, rtol=0)
    assert changed_bases(ours)["default"]["init"] == "pissa"


# ---- LoftQ ---------------------------------------------------------------------------------
@pytest.fixture
def peft_loftq_on_cpu(monkeypatch):
    """PEFT's own LoftQ, run on the CPU: its ``loftq_init`` moves the weight to "cuda" (or
    "xpu") unconditionally, and ``LoraConfig`` asks for scipy, which LoftQ no longer uses."""
    pytest.importorskip("bitsandbytes")
    real_find_spec, real_to = importlib.util.find_spec, torch.Tensor.to
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: True if n == "scipy" else real_find_spec(n, *a))

    def gpu(d):
        return ((isinstance(d, str) and d.split(":")[0] in ("cuda", "xpu"))
                or (isinstance(d, torch.device) and d.type in ("cuda", "xpu")))

    def to(self, *args, **kwargs):
        args = tuple("cpu" if gpu(a) else a for a in args)
        if gpu(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)

    def make(model, r, alpha, iters):
        from peft import LoftQConfig, LoraConfig, get_peft_model
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="loftq",
                            loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=iters))
        return get_peft_model(model, config)
    return make


def test_loftq_equals_peft(peft_loftq_on_cpu):
    """PEFT's LoftQ ignores scaling (its B·A fits the error, not scaling·B·A), so the two agree
    at scaling 1 (lora_alpha == r), where they are bit for bit the same."""
    from peft import LoftQConfig
    ours, theirs = base(), base()
    x = ids(ours)
    inject(ours, TARGETS, r=4, lora_alpha=4, init_lora_weights="loftq",
           loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=3))
    peft_model = peft_loftq_on_cpu(theirs, 4, 4, 3)
    for name, layer in lora_layers(ours).items():
        other = peft_model.base_model.model.get_submodule(name)
        for what in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, what)["default"].weight,
                                       getattr(other, what)["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.base_layer.weight, other.base_layer.weight, atol=0, rtol=0)
    torch.testing.assert_close(logits(ours, x), logits(peft_model, x), atol=1e-5, rtol=0)


def test_loftq_error_is_below_plain_nf4_and_falls_with_iterations():
    model = base()
    names = [n for n in surgery.target_names(model, TARGETS)]
    plain, by_iter = [], {1: [], 2: [], 5: []}
    for name in names:
        w = model.get_submodule(name).weight.detach()
        plain.append(relative_error(w, dequantize_nf4(quantize_nf4(w, 64, False), torch.float32)))
        for n in by_iter:
            a, b, q = loftq_init(w, 8, 2.0, n)
            by_iter[n].append(relative_error(w, dequantize_nf4(q, torch.float32) + 2.0 * b @ a))
    for i in range(len(names)):  # layer by layer, one round already beats plain NF4
        assert by_iter[1][i] < plain[i] * 0.95, names[i]
    mean = {n: sum(v) / len(v) for n, v in by_iter.items()}
    assert sum(plain) / len(plain) > mean[1] > mean[2] > mean[5], (sum(plain) / len(plain), mean)


def test_loftq_is_scaling_aware():
    """The same scaling·B·A for any lora_alpha, so the same starting error (PEFT's LoftQ would
    start at dequant(Q) + scaling·(fit of the error), off by (scaling - 1) times the fit)."""
    w = base().get_submodule("model.layers.0.mlp.down_proj").weight.detach()
    a1, b1, q1 = loftq_init(w, 8, 1.0, 2)
    a4, b4, q4 = loftq_init(w, 8, 4.0, 2)
    assert torch.equal(q1.packed, q4.packed)
    torch.testing.assert_close(4.0 * b4 @ a4, b1 @ a1, atol=1e-5, rtol=0)


def test_loftq_base_is_an_nf4_weight_that_quantize_model_stores_exactly():
    """The LoftQ base is float (as PEFT's), holding NF4 values: saved with its adapter, unwrapped
    and quantized (blocksize 64, no double quantization) it becomes exactly LoftQ's Q, and the
    adapter loaded back on that 4-bit base gives the same logits."""
    model = base()
    w = model.get_submodule("model.layers.1.self_attn.v_proj").weight.detach().clone()
    x = ids(model)
    inject(model, TARGETS, r=4, lora_alpha=8, init_lora_weights="loftq", loftq_config={"loftq_iter": 2})
    train_a_little(model)
    want = logits(model, x)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, tmp, changed_base_ok=True)
        remove_lora(model)
        # (only LoftQ's layers: the others would get plain NF4's error)
        quantize_model(model, skip=["k_proj", "o_proj", "gate_proj", "up_proj", "lm_head"],
                       double_quant=False)
        layer = model.get_submodule("model.layers.1.self_attn.v_proj")
        assert isinstance(layer, Linear4bit)
        _, _, q = loftq_init(w, 4, 2.0, 2)
        assert torch.equal(layer.weight.packed, q.packed) and torch.equal(layer.weight.absmax, q.absmax)
        load_adapter(model, tmp)
    torch.testing.assert_close(logits(model, x), want, atol=1e-4, rtol=0)


# ---- what saving does with a changed base --------------------------------------------------
def test_saving_a_pissa_adapter_is_refused_unless_told_what_to_write(tmp_path):
    model = base()
    inject(model, TARGETS, r=4, lora_alpha=8, init_lora_weights="pissa")
    with pytest.raises(ValueError, match=r"'pissa'.*changed the base.*convert_to_lora=True.*changed_base_ok"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_pissa_converted_to_lora_applies_to_the_original_base(tmp_path):
    """After 'training', convert_to_lora writes a rank-2r plain LoRA: on the ORIGINAL base it
    gives the PiSSA model's logits, in loracore and in PEFT."""
    from peft import PeftModel
    model = base()
    x = ids(model)
    inject(model, TARGETS, r=4, lora_alpha=8, init_lora_weights="pissa")
    train_a_little(model)
    want = logits(model, x)
    save_adapter(model, tmp_path / "lora", convert_to_lora=True)
    import json
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    original = load_adapter(base(), tmp_path / "lora")  # strict: the original's fingerprint
    torch.testing.assert_close(logits(original, x), want, atol=1e-4, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(base(), tmp_path / "lora")
    torch.testing.assert_close(logits(theirs, x), want, atol=1e-4, rtol=0)


def test_pissa_converted_with_rslora_keeps_scaling(tmp_path):
    model = base()
    x = ids(model)
    inject(model, TARGETS, r=4, lora_alpha=8, use_rslora=True, init_lora_weights="pissa")
    train_a_little(model)
    want = logits(model, x)
    save_adapter(model, tmp_path, convert_to_lora=True)
    torch.testing.assert_close(logits(load_adapter(base(), tmp_path), x), want, atol=1e-4, rtol=0)


def test_changed_base_ok_saves_for_the_changed_base_only(tmp_path):
    model = base()
    x = ids(model)
    inject(model, TARGETS, r=4, lora_alpha=8, init_lora_weights="pissa")
    train_a_little(model)
    want = logits(model, x)
    save_adapter(model, tmp_path, changed_base_ok=True)
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(base(), tmp_path)  # the original is not its base
    remove_lora(model)  # the residual base stays
    assert changed_bases(model) == {}
    torch.testing.assert_close(logits(load_adapter(model, tmp_path), x), want, atol=1e-6, rtol=0)


def test_a_loftq_adapter_cannot_be_converted(tmp_path):
    model = base()
    inject(model, TARGETS, r=4, lora_alpha=8, init_lora_weights="loftq")
    with pytest.raises(ValueError, match=r"'loftq'.*changed_base_ok=True"):
        save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="converts a PiSSA adapter.*loftq.*changed_base_ok"):
        save_adapter(model, tmp_path / "a", convert_to_lora=True)
    assert not (tmp_path / "a").exists()
    plain = base()
    inject(plain, TARGETS, r=4, lora_alpha=8)
    with pytest.raises(ValueError, match="converts a PiSSA adapter.*plain LoRA"):
        save_adapter(plain, tmp_path / "a", convert_to_lora=True)


def test_delete_adapter_forgets_the_record_but_not_the_changed_base():
    model = base()
    inject(model, TARGETS, r=4, lora_alpha=8, init_lora_weights="pissa", adapter_name="p")
    inject(model, ["o_proj"], r=4, lora_alpha=8, adapter_name="plain")
    assert list(changed_bases(model)) == ["p"]
    assert set(changed_bases(model)["p"]["initial"]) == set(surgery.target_names(model, TARGETS))
    residual = model.get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight.clone()
    delete_adapter(model, "p")
    assert changed_bases(model) == {}
    assert torch.equal(model.get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight, residual)


# ---- refusals, all or nothing --------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    ({"init_lora_weights": "gaussian"}, ValueError, r"not one loracore knows.*\[True, 'pissa', 'loftq'\] or 'pissa_niter_K'"),
    ({"init_lora_weights": "pissa_niter_x"}, ValueError, "not one loracore knows"),
    ({"init_lora_weights": "pissa_niter_4", "use_dora": True}, ValueError, "use_dora=True is not supported"),
    ({"init_lora_weights": False}, ValueError, "not one loracore knows"),
    ({"init_lora_weights": "pissa", "use_dora": True}, ValueError, "use_dora=True is not supported"),
    ({"init_lora_weights": "loftq", "use_dora": True}, ValueError, "use_dora=True is not supported"),
    ({"loftq_config": {"loftq_iter": 2}}, ValueError, "loftq_config is given but init_lora_weights"),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 8}}, ValueError, "NF4 .4 bits. only"),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_iter": 0}}, ValueError, "loftq_iter must be an int >= 1"),
    ({"init_lora_weights": "loftq", "loftq_config": {"iters": 2}}, ValueError, r"unknown keys \['iters'\]"),
    ({"init_lora_weights": "loftq", "loftq_config": 3}, TypeError, "must be a dict"),
    ({"init_lora_weights": "pissa", "r": 65}, ValueError, "r=65 is more than min.out, in. = 64"),
])
def test_bad_init_arguments_are_refused_and_change_nothing(kwargs, error, match):
    model = base()
    before = snapshot(model)
    kwargs = {"r": 4, **kwargs}
    with pytest.raises(error, match=match):
        inject(model, TARGETS, lora_alpha=8, **kwargs)
    assert_unchanged(model, before)


def test_loftq_and_pissa_refuse_a_quantized_base():
    model = quantize_model(base())
    before = snapshot(model)
    with pytest.raises(TypeError, match="Linear4bit, not a float nn.Linear.*quantize_model.model, double_quant=False"):
        inject(model, TARGETS, r=4, lora_alpha=8, init_lora_weights="loftq")
    with pytest.raises(TypeError, match="Linear4bit.*run PiSSA on the float model"):
        inject(model, TARGETS, r=4, lora_alpha=8, init_lora_weights="pissa")
    assert_unchanged(model, before)


def test_a_layer_with_adapters_or_a_tied_weight_is_refused():
    model = base()
    inject(model, ["q_proj"], r=4, lora_alpha=8, adapter_name="old")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"already has adapters \['old'\].*changes the base weight"):
        inject(model, TARGETS, r=4, lora_alpha=8, init_lora_weights="pissa", adapter_name="new")
    assert_unchanged(model, before)
    tied = base()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    before = snapshot(tied)
    with pytest.raises(ValueError, match=r"'lm_head' is tied to \['model.embed_tokens.weight'\]"):
        inject(tied, ["lm_head"], r=4, lora_alpha=8, init_lora_weights="pissa")
    assert_unchanged(tied, before)


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_a_failure_half_way_leaves_the_model_exactly_as_it_was(monkeypatch, init):
    """The third layer's swap fails after two bases were changed: every base weight comes back
    bit for bit (the same Parameter objects), no LoRA layer is left, and no record."""
    model = base()
    before, params = snapshot(model), {n: p for n, p in model.named_parameters()}
    fail_on_call(monkeypatch, surgery, "_replace", 3)
    with pytest.raises(RuntimeError, match="injected failure"):
        inject(model, TARGETS, r=4, lora_alpha=8, init_lora_weights=init)
    assert_unchanged(model, before)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert lora_layers(model) == {} and changed_bases(model) == {}
    # the failure was really half-way: without it, the same call changes the bases
    monkeypatch.undo()
    inject(model, TARGETS, r=4, lora_alpha=8, init_lora_weights=init)
    assert not torch.equal(model.get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight,
                           before["tensors"]["model.layers.0.self_attn.q_proj.weight"])


def test_plain_inject_is_unchanged_by_the_new_arguments():
    a, b = base(), copy.deepcopy(base())
    inject(a, TARGETS, r=4, lora_alpha=8)
    inject(b, TARGETS, r=4, lora_alpha=8, init_lora_weights=True)
    assert changed_bases(a) == {} == changed_bases(b)
    for n, layer in lora_layers(b).items():
        assert torch.equal(layer.lora_B["default"].weight, torch.zeros_like(layer.lora_B["default"].weight))
        assert torch.equal(layer.base_layer.weight, lora_layers(a)[n].base_layer.weight)
