"""Adapter files (loracore/adapters.py): PEFT's format, the base fingerprint, the refusals."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import loracore.adapters as adapters
from loracore.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from loracore.lora import inject, lora_layers, merge_adapters



def tiny_qwen2() -> torch.nn.Module:
    """A seeded 2-layer Qwen2 (hidden 64, 4 heads, 2 kv heads): milliseconds to build."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval()


def randomize_B(model: torch.nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """Give every lora_B a non-zero value (B starts at zero, and would prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for lin in layer.lora_B.values():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)


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
