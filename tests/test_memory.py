"""loracore.memory: counts checked against real modules (transformers on the meta device,
loracore's inject, quantize_nf4, PagedAdamW), bytes against hand arithmetic, and the
relations any reader would expect (LoRA below full, FSDP dividing, 8-bit below 32-bit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from loracore.lora import inject, lora_layers, trainable_parameters
from loracore.memory import (GB, LLAMA_2_7B, LLAMA_2_70B, LLAMA_3_1_405B, METHODS, PRESETS,
                             QWEN2_0_5B, SMOLLM2_135M, ModelShape, adam_state_bytes, format_gb,
                             lora_parameters, lora_tensors, nf4_bytes, training_memory)
from loracore.models import load_base_model
from loracore.nf4 import quantize_nf4
from loracore.optim import PagedAdamW
from loracore.qlora import Linear4bit, quantize_model


def meta_model(shape: ModelShape) -> torch.nn.Module:
    """The transformers model of ``shape`` on the meta device: real modules, no memory."""
    fields = dict(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                  intermediate_size=shape.intermediate_size,
                  num_hidden_layers=shape.num_hidden_layers,
                  num_attention_heads=shape.num_attention_heads,
                  num_key_value_heads=shape.num_key_value_heads,
                  tie_word_embeddings=shape.tie_word_embeddings)
    cls, config = ((Qwen2ForCausalLM, Qwen2Config(**fields)) if shape.qkv_bias else
                   (LlamaForCausalLM, LlamaConfig(**fields)))
    with torch.device("meta"):
        return cls(config)


def shape_of(model: torch.nn.Module, name: str = "tiny") -> ModelShape:
    c = model.config
    return ModelShape(name, c.vocab_size, c.hidden_size, c.intermediate_size,
                      c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                      c.tie_word_embeddings, qkv_bias=c.model_type == "qwen2")


# ---- counts -------------------------------------------------------------------------------
def test_published_parameter_counts():
    # as the model cards and `model.num_parameters()` give them
    assert LLAMA_2_7B.num_parameters == 6_738_415_616
    assert LLAMA_2_70B.num_parameters == 68_976_648_192
    assert SMOLLM2_135M.num_parameters == 134_515_008
    assert QWEN2_0_5B.num_parameters == 494_032_768


@pytest.mark.parametrize("name", [n for n in PRESETS if n != LLAMA_3_1_405B.name])
def test_counts_equal_the_transformers_model(name):
    shape = PRESETS[name]
    model = meta_model(shape)
    assert shape.num_parameters == sum(p.numel() for p in model.parameters())
    block = model.model.layers[0]
    for proj, (out, inp) in shape.linear_shapes().items():
        layer = getattr(block.self_attn if proj[0] in "qkvo" else block.mlp, proj)
        assert tuple(layer.weight.shape) == (out, inp), proj


def test_405b_blocks_equal_the_transformers_model():
    # two blocks stand for 126 (building all on the meta device takes a while); the rest is
    # the same arithmetic as the other presets
    small = ModelShape("405B, 2 blocks", 128256, 16384, 53248, 2, 128, 8)
    assert small.num_parameters == sum(p.numel() for p in meta_model(small).parameters())
    per_block = (small.num_parameters - 2 * 128256 * 16384 - 16384) // 2
    assert LLAMA_3_1_405B.num_parameters == 2 * 128256 * 16384 + 16384 + 126 * per_block


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"],
                                     ["gate_proj", "up_proj", "down_proj"], "all-linear"])
@pytest.mark.parametrize("r", [4, 16])
def test_lora_counts_equal_inject(targets, r):
    for shape in (SMOLLM2_135M, QWEN2_0_5B, LLAMA_2_7B):
        model = inject(meta_model(shape), targets, r=r, lora_alpha=2 * r)
        trainable, total, _ = trainable_parameters(model)
        assert lora_parameters(shape, r, targets) == trainable
        assert shape.num_parameters == total - trainable
        sizes = sorted(n for _, n, copies in lora_tensors(shape, r, targets) for _ in range(copies))
        real = sorted(p.numel() for layer in lora_layers(model).values()
                      for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight))
        assert sizes == real


def test_lora_count_by_hand():
    # r = 16 on q and v of Llama-2-7B: 32 blocks x 2 layers x 16 x (4096 + 4096)
    assert lora_parameters(LLAMA_2_7B, 16, ["q_proj", "v_proj"]) == 32 * 2 * 16 * 8192 == 8_388_608
    # Llama-2-70B's k and v are narrow (8 key/value heads of 128): 16 x (8192 + 1024)
    assert lora_parameters(LLAMA_2_70B, 16, ["v_proj"]) == 80 * 16 * (8192 + 1024)


# ---- bytes of one tensor ------------------------------------------------------------------
@pytest.mark.parametrize("numel", [64, 4096, 64 * 256, 64 * 256 + 64, 3 * 64 * 257])
def test_nf4_bytes_equal_quantize_nf4(numel):
    w = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    assert nf4_bytes(numel) == quantize_nf4(w).nbytes


@pytest.mark.parametrize("numel", [1000, 4095, 4096, 65536, 70_000])
def test_adam_state_bytes_equal_paged_adamw(numel):
    for bits, optimizer in ((32, "adamw"), (8, "adamw8bit")):
        p = torch.nn.Parameter(torch.zeros(numel))
        with PagedAdamW([p], state_bits=bits) as opt:
            laid_out = opt.paging_stats()["state_bytes"]
        # the pool aligns each state tensor to 256 bytes; the last one ends where it ends
        assert 0 <= laid_out - adam_state_bytes(numel, optimizer) < 3 * 256, (numel, optimizer)
        if numel % (256 * 64) == 0:
            assert laid_out == adam_state_bytes(numel, optimizer)
    assert adam_state_bytes(4095, "adamw8bit") == 8 * 4095  # under MIN_8BIT_SIZE: float32
    assert adam_state_bytes(65536, "adamw8bit") == 2 * (65536 + 4 * 256)


def test_qlora_weights_equal_quantize_model_on_the_tiny_model():
    model, _ = load_base_model("tiny-qwen2")
    shape = shape_of(model)
    assert shape.num_parameters == model.num_parameters()
    quantize_model(model)
    packed = sum(sum(b.numel() * b.element_size() for n, b in m.named_buffers() if n.startswith("weight_"))
                 for m in model.modules() if isinstance(m, Linear4bit))
    kept = sum(p.numel() for p in model.parameters())  # embeddings, norms, biases: not quantized
    mem = training_memory(shape, "qlora", r=8, weight_bytes=4)
    assert mem.weights == packed + 4 * kept + 4 * lora_parameters(shape, 8)


# ---- the breakdown ------------------------------------------------------------------------
def test_full_fine_tuning_is_16_bytes_per_parameter():
    n = LLAMA_2_7B.num_parameters
    mem = training_memory(LLAMA_2_7B)
    assert (mem.weights, mem.gradients, mem.master_weights, mem.optimizer_state) == (2 * n, 2 * n, 4 * n, 8 * n)
    assert mem.total == 16 * n and mem.trainable == n
    assert round(mem.total / GB, 1) == 107.8
    assert format_gb(training_memory(LLAMA_2_70B).total, 0) == "1,104 GB"
    # pure bf16 training keeps no master copy; float32 training needs none
    assert training_memory(LLAMA_2_7B, master_weights=False).total == 12 * n
    assert training_memory(LLAMA_2_7B, weight_bytes=4).total == 16 * n


def test_lora_by_hand():
    n, k = LLAMA_2_70B.num_parameters, lora_parameters(LLAMA_2_70B, 16)
    mem = training_memory(LLAMA_2_70B, "lora", r=16)
    assert mem.weights == 2 * n + 4 * k          # bf16 base, float32 adapter
    assert (mem.gradients, mem.master_weights, mem.optimizer_state) == (4 * k, 0, 8 * k)
    assert mem.trainable == k and mem.total == 2 * n + 16 * k


def test_qlora_quantizes_only_the_blocks_linear_layers():
    s = LLAMA_2_7B
    linear = sum(o * i for o, i in s.linear_shapes().values())
    k = lora_parameters(s, 16)
    mem = training_memory(s, "qlora")
    expected = (s.num_hidden_layers * nf4_bytes_sum(s) + 2 * (s.num_parameters - s.num_hidden_layers * linear)
                + 4 * k)
    assert mem.weights == expected
    assert 4.126 < 8 * nf4_bytes_sum(s) / linear < 4.128  # QLoRA's "4.127 bits"


def nf4_bytes_sum(shape: ModelShape) -> int:
    return sum(nf4_bytes(o * i) for o, i in shape.linear_shapes().values())


@pytest.mark.parametrize("shape", [LLAMA_2_7B, LLAMA_2_70B, SMOLLM2_135M])
def test_methods_and_optimizers_order_as_expected(shape):
    full, lora, qlora = (training_memory(shape, m).total for m in METHODS)
    assert qlora < lora < full
    assert training_memory(shape, optimizer="adamw8bit").total < full
    assert training_memory(shape, "lora", r=64).total > lora
    assert training_memory(shape, "lora", target_modules=["q_proj", "v_proj"]).total < lora


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_divides_every_part_and_ddp_copies_it(method):
    one = training_memory(LLAMA_2_70B, method)
    ddp = training_memory(LLAMA_2_70B, method, n_gpus=8)
    fsdp = training_memory(LLAMA_2_70B, method, n_gpus=8, sharded=True)
    for part in ("weights", "gradients", "master_weights", "optimizer_state", "total"):
        assert getattr(ddp, part) == getattr(one, part)
        assert getattr(fsdp, part) == pytest.approx(getattr(one, part) / 8, rel=1e-12)
    assert "8 GPUs, FSDP" in str(fsdp) and f"{one.total / GB:,.1f} GB" in str(one)


def test_8bit_state_is_about_a_quarter():
    n = LLAMA_2_7B.num_parameters
    state = training_memory(LLAMA_2_7B, optimizer="adamw8bit").optimizer_state
    assert 2 * n < state < 2.04 * n   # 2 bytes + 8/256 of absmax per parameter


@pytest.mark.parametrize("kwargs, words", [
    (dict(method="partial"), "method"), (dict(optimizer="sgd"), "optimizer"),
    (dict(method="lora", target_modules=["q_proj", "qkv"]), "target_modules"),
    (dict(method="lora", target_modules=[]), "target_modules"),
    (dict(method="lora", r=0), "r must"), (dict(n_gpus=0), "n_gpus"),
    (dict(weight_bytes=1.5), "weight_bytes"),
])
def test_bad_arguments_are_refused_in_words(kwargs, words):
    with pytest.raises(ValueError, match=words):
        training_memory(LLAMA_2_7B, **kwargs)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="positive integers"):
        ModelShape("broken", 32000, 0, 11008, 32, 32, 32)
    with pytest.raises(ValueError, match="heads"):
        ModelShape("broken", 32000, 4096, 11008, 32, 30, 32)


# ---- the lessons use it -------------------------------------------------------------------
LESSONS = Path(__file__).resolve().parent.parent / "lessons"


def _lesson(name: str) -> tuple[str, str]:
    """(code of every cell, every stored text output) of ``lessons/name``."""
    cells = json.loads((LESSONS / name).read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    outs = "\n".join("".join(o.get("text", "")) for c in cells if c["cell_type"] == "code"
                     for o in c.get("outputs", []))
    return code, outs


def test_lessons_03_07_and_11_show_the_functions_figures():
    def t(shape, method, **kw):
        return training_memory(shape, method, r=16, **kw).total / GB

    expected = {
        "03_lora_in_a_transformer.ipynb": [f"{t(LLAMA_2_7B, 'full'):,.0f} GB",
                                           f"{t(LLAMA_2_70B, 'full'):,.0f} GB",
                                           f"{t(LLAMA_2_7B, 'lora'):,.1f} GB",
                                           f"{t(LLAMA_2_70B, 'qlora'):,.1f} GB"],
        "07_paged_optimizers.ipynb": [f"{t(LLAMA_2_70B, 'full'):,.0f}",
                                      f"{t(LLAMA_2_70B, 'full', optimizer='adamw8bit'):,.0f}",
                                      f"{t(LLAMA_2_70B, 'lora'):,.0f}"],
        "11_beyond_one_machine.ipynb": [f"{t(LLAMA_2_7B, 'full'):9,.1f}",
                                        f"{t(LLAMA_2_70B, 'full'):9,.1f}",
                                        f"{t(LLAMA_2_70B, 'lora', n_gpus=8, sharded=True):9,.1f}",
                                        f"{t(LLAMA_2_70B, 'qlora', n_gpus=2, sharded=True):9,.1f}"],
    }
    for name, figures in expected.items():
        code, outs = _lesson(name)
        assert "training_memory(" in code, f"{name} no longer computes its memory figures with training_memory"
        assert "GB = 1e9" not in code, f"{name} defines its own GB: use loracore.memory.GB"
        missing = [f for f in figures if f not in outs]
        assert not missing, f"{name}'s stored outputs lack {missing}: rerun it (make execute NB=lessons/{name})"
