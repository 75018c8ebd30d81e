"""export_gguf_adapter (loracore/gguf_export.py) and `loracore export gguf`: an adapter folder
written as llama.cpp's GGUF LoRA file, read back with the `gguf` package's own reader.

What llama.cpp does with the file (src/llama-adapter.cpp, llama_adapter_lora_init_impl, and
src/llama-adapter.h, llama_adapter_lora_weight::get_scale): it pairs ``X.lora_a`` with
``X.lora_b`` for the base tensor ``X``, requires ``a.ne = [in, r]`` and ``b.ne = [r, out]``,
and adds ``(alpha / r) * B (A x)`` with ``r = b.ne[0]`` and one ``adapter.lora.alpha`` per
file. :func:`llama_cpp_delta` below computes that ΔW from the file alone; the tests compare it
with PEFT's ``scaling * B @ A`` from the safetensors file.

Tiny random Qwen2 and Llama models (milliseconds); the one test that runs llama.cpp itself is
skipped where ``llama_cpp`` (llama-cpp-python) is not installed.
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import with_adapter
from loracore.adapter_file import read_adapter
from loracore.adapters import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from loracore.cli import main
from loracore.gguf_export import export_gguf_adapter, read_gguf_header, rope_rows_interleaved
from loracore.models import load_base_model
from loracore.surgery import inject, lora_layers

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: HF module -> llama.cpp tensor, written out by hand (not from gguf's map, which the code uses)
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def tiny_qwen():
    model, _ = load_base_model("tiny-qwen2", verbose=False)
    return model


@pytest.fixture(scope="module")
def tiny_llama():
    """A tiny_qwen random Llama: 2 layers, hidden 64, 4 heads of 16, 2 KV heads (GQA)."""
    config = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def gguf_name(module: str) -> str:
    """``model.layers.1.self_attn.q_proj`` -> ``blk.1.attn_q.weight``."""
    _, _, block, rest = module.split(".", 3)
    return f"blk.{block}.{GGUF_NAMES[rest]}.weight"


def read(path: Path) -> tuple[dict, dict]:
    """(metadata, {tensor name: (GGML type name, ne as a list, float32 array in numpy's order)})."""
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.data.shape[:-1] + (-1,)) \
            if t.tensor_type == gguf.GGMLQuantizationType.BF16 else np.asarray(t.data, np.float32)
        tensors[t.name] = (t.tensor_type.name, [int(d) for d in t.shape], data.astype(np.float32))
    return fields, tensors


def llama_cpp_delta(fields: dict, tensors: dict, base: str) -> torch.Tensor:
    """ΔW ``(out, in)`` as llama.cpp applies it: ``alpha / r * B @ A``, r from lora_b."""
    A = torch.from_numpy(tensors[base + ".lora_a"][2])
    B = torch.from_numpy(tensors[base + ".lora_b"][2])
    return fields["adapter.lora.alpha"] / tensors[base + ".lora_b"][1][0] * (B.double() @ A.double())


def peft_delta(folder: Path, module: str) -> torch.Tensor:
    m = read_adapter(folder).modules[module]
    return m.scaling * (m.lora_B.double() @ m.lora_A.double())


# ---- the file llama.cpp reads ------------------------------------------------------------------
def test_qwen2_file_has_llama_cpps_names_shapes_values_and_metadata(tiny_qwen, tmp_path):
    folder = save_adapter(with_adapter(tiny_qwen, ALL, r=4, alpha=8), tmp_path / "ad")
    out = export_gguf_adapter(folder, tmp_path / "x" / "ad.gguf")
    fields, tensors = read(out)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "qwen2" and fields["adapter.lora.alpha"] == 8.0
    saved = load_file(str(folder / WEIGHTS_NAME))
    modules = [f"model.layers.{i}.{rest}" for i in range(2) for rest in GGUF_NAMES]
    assert set(tensors) == {gguf_name(m) + s for m in modules for s in (".lora_a", ".lora_b")}
    for m in modules:
        A = saved[f"base_model.model.{m}.lora_A.weight"]
        B = saved[f"base_model.model.{m}.lora_B.weight"]
        kind_a, ne_a, a = tensors[gguf_name(m) + ".lora_a"]
        kind_b, ne_b, b = tensors[gguf_name(m) + ".lora_b"]
        # llama.cpp's check: a.ne = [in, r], b.ne = [r, out] (numpy's order reversed)
        assert (kind_a, ne_a, kind_b, ne_b) == ("F32", [A.shape[1], 4], "F32", [4, B.shape[0]])
        assert np.array_equal(a, A.numpy()) and np.array_equal(b, B.numpy())  # Qwen2: as stored
        assert torch.allclose(llama_cpp_delta(fields, tensors, gguf_name(m)), peft_delta(folder, m))
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()  # readable by Ollama's own user
    modelfile = (tmp_path / "x" / "ad.Modelfile").read_text()
    assert "\nADAPTER ad.gguf\n" in modelfile and "FROM BASE_MODEL.gguf" in modelfile


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_rslora_is_folded_into_alpha(tiny_qwen, tmp_path):
    """rsLoRA scales by alpha / sqrt(r); llama.cpp divides by r, so the file holds alpha * sqrt(r)."""
    folder = save_adapter(with_adapter(tiny_qwen, ["q_proj", "down_proj"], r=16, alpha=8, use_rslora=True),
                          tmp_path / "rs")
    fields, tensors = read(export_gguf_adapter(folder, tmp_path / "rs.gguf"))
    assert fields["adapter.lora.alpha"] == pytest.approx(8 * math.sqrt(16))
    for m in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        ours, theirs = llama_cpp_delta(fields, tensors, gguf_name(m)), peft_delta(folder, m)
        assert read_adapter(folder).modules[m].scaling == 2.0
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)


def test_mixed_ranks_with_one_alpha_are_exact(tiny_qwen, tmp_path):
    """llama.cpp reads each module's rank from its lora_b, so a rank_pattern needs nothing."""
    trained = with_adapter(tiny_qwen, ["q_proj"], r=8, alpha=16)
    inject(trained, ["v_proj"], r=2, lora_alpha=16)
    folder = save_adapter(trained, tmp_path / "mixed")
    assert json.loads((folder / CONFIG_NAME).read_text())["rank_pattern"]
    fields, tensors = read(export_gguf_adapter(folder, tmp_path / "mixed.gguf"))
    for m in read_adapter(folder).modules:
        assert torch.allclose(llama_cpp_delta(fields, tensors, gguf_name(m)), peft_delta(folder, m))


@pytest.mark.parametrize("dtype, kind", [("f16", "F16"), ("bf16", "BF16")])
def test_half_precision_files_hold_the_rounded_factors(tiny_qwen, tmp_path, dtype, kind):
    folder = save_adapter(with_adapter(tiny_qwen, ["q_proj"], r=4, alpha=8), tmp_path / "ad")
    _, tensors = read(export_gguf_adapter(folder, tmp_path / f"{dtype}.gguf", dtype=dtype))
    torch_dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for m, module in read_adapter(folder).modules.items():
        for what, t in (("lora_a", module.lora_A), ("lora_b", module.lora_B)):
            got_kind, _, got = tensors[f"{gguf_name(m)}.{what}"]
            assert got_kind == kind
            assert np.array_equal(got, t.to(torch_dtype).float().numpy())


# ---- Llama: the rows of q and k in llama.cpp's rotary order ------------------------------------
def test_rope_rows_interleaved_small_example():
    B = torch.arange(8.0).reshape(8, 1)  # 2 heads of 4 rows
    assert rope_rows_interleaved(B, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    with pytest.raises(ValueError, match="heads"):
        rope_rows_interleaved(torch.zeros(6, 1), 2)


def test_llama_q_and_k_rows_are_what_transformers_gguf_loader_undoes(tiny_llama, tmp_path):
    """transformers reads llama.cpp's Llama GGUF by undoing the converter's q/k reordering
    (LlamaTensorProcessor): applied to our lora_b it must give PEFT's B back; v and o as stored."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    folder = save_adapter(with_adapter(tiny_llama, ALL, r=4, alpha=8), tmp_path / "llama")
    with pytest.raises(ValueError, match="head counts"):
        export_gguf_adapter(folder, tmp_path / "no-heads.gguf")  # the record has no head counts
    assert not (tmp_path / "no-heads.gguf").exists()
    out = export_gguf_adapter(folder, tmp_path / "llama.gguf", config=tiny_llama.config)
    fields, tensors = read(out)
    assert fields["general.architecture"] == "llama"
    undo = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    reordered = 0
    for m, module in read_adapter(folder).modules.items():
        name = gguf_name(m)
        b = tensors[name + ".lora_b"][2]
        back = undo.process(b, name + ".lora_b").weights
        assert np.array_equal(back, module.lora_B.numpy()), m
        assert np.array_equal(tensors[name + ".lora_a"][2], module.lora_A.numpy())
        reordered += not np.array_equal(b, module.lora_B.numpy())
    assert reordered == 4  # q and k of both layers moved, so the check above could fail


def tiny_base_gguf(model: nn.Module, arch: str, path: Path, *, heads=(4, 2), drop=(), reshape=()) -> Path:
    """A stand-in base GGUF: ``model``'s linear weights (zeros) under llama.cpp's names, and the
    head counts; ``drop``/``reshape`` leave out / widen named tensors."""
    names = gguf.get_tensor_name_map({"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch], 2)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_head_count(heads[0])
    writer.add_head_count_kv(heads[1])
    for name, p in model.named_parameters():
        target = names.get_name(name, try_suffixes=(".weight",))
        if target is None or p.dim() != 2 or target in drop:
            continue
        shape = (p.shape[0] + 1, p.shape[1]) if target in reshape else tuple(p.shape)
        writer.add_tensor(target, np.zeros(shape, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_base_gguf_gives_the_heads_and_is_checked_like_llama_cpp(tiny_llama, tmp_path):
    folder = save_adapter(with_adapter(tiny_llama, ALL, r=4, alpha=8), tmp_path / "llama")
    base = tiny_base_gguf(tiny_llama, "llama", tmp_path / "base.gguf")
    out = export_gguf_adapter(folder, tmp_path / "a.gguf", base_gguf=base)
    same = export_gguf_adapter(folder, tmp_path / "b.gguf", config=tiny_llama.config, modelfile=False)
    assert read(out)[1].keys() == read(same)[1].keys()
    assert all(np.array_equal(read(out)[1][k][2], read(same)[1][k][2]) for k in read(out)[1])
    assert (tmp_path / "a.Modelfile").read_text().endswith(f"FROM {base.resolve()}\nADAPTER a.gguf\n")
    assert not (tmp_path / "b.Modelfile").exists()
    bad = tiny_base_gguf(tiny_llama, "llama", tmp_path / "bad.gguf", drop={"blk.0.attn_v.weight"},
                         reshape={"blk.1.ffn_up.weight"})
    with pytest.raises(ValueError) as err:
        export_gguf_adapter(folder, tmp_path / "c.gguf", base_gguf=bad)
    assert "blk.0.attn_v.weight is not in the base GGUF" in str(err.value)
    assert "blk.1.ffn_up.weight is [in, out] = [64, 97]" in str(err.value)
    qwen = tiny_base_gguf(tiny_llama, "qwen2", tmp_path / "qwen.gguf")
    with pytest.raises(ValueError, match="architecture disagrees"):
        export_gguf_adapter(folder, tmp_path / "c.gguf", base_gguf=qwen)
    assert not (tmp_path / "c.gguf").exists()


def test_read_gguf_header_agrees_with_gguf_reader_and_refuses_a_cut_file(tiny_qwen, tmp_path):
    """The export's own header reader (it steps over the vocabulary arrays instead of parsing
    them) gives what gguf's reader gives, for every value type; a cut or foreign file is refused."""
    path = tmp_path / "h.gguf"
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_uint32("qwen2.attention.head_count", 14)
    writer.add_uint64("big", 2**40 + 3)
    writer.add_int8("i8", -5)
    writer.add_int16("i16", -300)
    writer.add_uint16("u16", 60000)
    writer.add_int32("i32", -70000)
    writer.add_int64("i64", -2**40)
    writer.add_float32("f32", 0.25)
    writer.add_float64("f64", 1 / 3)
    writer.add_bool("flag", True)
    writer.add_string("general.name", "tiny é")
    writer.add_token_list(["a", "bé", "", "[PAD3]"])    # an array of strings
    writer.add_token_types([1, 1, 3, 5])                # an array of int32
    writer.add_array("nested", [[1, 2], ["x", "yz"]])   # arrays of arrays
    writer.add_uint32("after.arrays", 7)                # read after stepping over them
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((3, 5), np.float32))
    writer.add_tensor("token_embd.weight", np.zeros((4, 2, 6), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    fields, shapes = read_gguf_header(path)
    reader = gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in reader.fields.items()
                if not k.startswith("GGUF.") and f.types[0] != gguf.GGUFValueType.ARRAY}
    assert fields == expected and fields["after.arrays"] == 7 and fields["general.name"] == "tiny é"
    assert "tokenizer.ggml.tokens" not in fields and "nested" not in fields
    assert shapes == {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert shapes == {"blk.0.attn_q.weight": (5, 3), "token_embd.weight": (6, 2, 4)}
    data = path.read_bytes()
    header_end = data.index(b"token_embd.weight") + len("token_embd.weight") + 4 + 3 * 8 + 4 + 8
    folder = save_adapter(with_adapter(tiny_qwen, ALL, r=4, alpha=8), tmp_path / "qwen")
    for cut in (0, 10, data.index(b"nested") + 3, header_end - 5):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises((ValueError, struct.error)):  # struct.error: it ends inside the header
            read_gguf_header(tmp_path / "cut.gguf")
        with pytest.raises(ValueError, match="is not a readable GGUF file"):
            export_gguf_adapter(folder, tmp_path / "x.gguf", base_gguf=tmp_path / "cut.gguf")
    assert not (tmp_path / "x.gguf").exists()
    read_gguf_header(tmp_path / "h.gguf")  # the whole header is read, not more
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ValueError, match="magic"):
        read_gguf_header(tmp_path / "not.gguf")


# ---- refused: what llama.cpp cannot load -------------------------------------------------------
def test_dora_alpha_pattern_and_rslora_with_mixed_ranks_are_refused(tiny_qwen, tmp_path):
    dora = save_adapter(with_adapter(tiny_qwen, ["q_proj"], r=4, alpha=8, use_dora=True), tmp_path / "dora")
    with pytest.raises(ValueError, match="DoRA"):
        export_gguf_adapter(dora, tmp_path / "dora.gguf")
    alphas = with_adapter(tiny_qwen, ["q_proj"], r=4, alpha=8)
    inject(alphas, ["v_proj"], r=4, lora_alpha=2)
    with pytest.raises(ValueError, match="alpha_pattern.*alpha 2 for.*alpha 8 for"):
        export_gguf_adapter(save_adapter(alphas, tmp_path / "alphas"), tmp_path / "alphas.gguf")
    rs = with_adapter(tiny_qwen, ["q_proj"], r=4, alpha=8, use_rslora=True)
    inject(rs, ["v_proj"], r=16, lora_alpha=8, use_rslora=True)
    with pytest.raises(ValueError, match="rsLoRA with modules of different ranks"):
        export_gguf_adapter(save_adapter(rs, tmp_path / "rs"), tmp_path / "rs.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob("*.Modelfile"))


def peft_folder(path: Path, modules: dict[str, tuple[int, int]], r: int = 2) -> Path:
    """An adapter folder as PEFT writes it (no loracore record): ``{module: (out, in)}``."""
    path.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for m, (out, inp) in modules.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, inp, generator=g)
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(out, r, generator=g)
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 4,
                                                "target_modules": sorted({m.rsplit(".", 1)[1] for m in modules})}))
    return path


def test_modules_without_a_llama_cpp_tensor_are_refused_together(tiny_qwen, tmp_path):
    folder = peft_folder(tmp_path / "odd", {"model.layers.0.self_attn.q_proj": (64, 64),
                                            "model.layers.0.self_attn.foo_proj": (64, 64),
                                            "model.layers.1.input_layernorm": (64, 64)})
    with pytest.raises(ValueError, match="does not say which model"):
        export_gguf_adapter(folder, tmp_path / "odd.gguf")  # PEFT's file: no record of its base
    with pytest.raises(ValueError) as err:
        export_gguf_adapter(folder, tmp_path / "odd.gguf", config=tiny_qwen.config)
    msg = str(err.value)
    assert "'model.layers.0.self_attn.foo_proj' has no tensor name in llama.cpp's 'qwen2' layout" in msg
    assert "'model.layers.1.input_layernorm' is 'blk.1.attn_norm.weight', which llama.cpp never adapts" in msg
    assert "q_proj" not in msg and not (tmp_path / "odd.gguf").exists()
    ok = peft_folder(tmp_path / "ok", {"model.layers.0.self_attn.q_proj": (64, 64)})
    fields, tensors = read(export_gguf_adapter(ok, tmp_path / "ok.gguf", config=tiny_qwen.config))
    assert set(tensors) == {"blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b"}


def test_an_architecture_without_a_mapping_is_refused(tiny_qwen, tmp_path):
    folder = save_adapter(with_adapter(tiny_qwen, ["q_proj"], r=2, alpha=4), tmp_path / "ad")
    config = tiny_qwen.config.to_dict() | {"architectures": ["GemmaForCausalLM"]}
    (tmp_path / "gemma").mkdir()
    (tmp_path / "gemma" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'GemmaForCausalLM'; loracore writes GGUF adapters for"):
        export_gguf_adapter(folder, tmp_path / "g.gguf", config=tmp_path / "gemma")
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_gguf_adapter(folder, tmp_path / "g.gguf", dtype="q4_0")
    assert not (tmp_path / "g.gguf").exists()


# ---- crash-safe --------------------------------------------------------------------------------
def test_a_failure_half_way_leaves_the_old_file_whole_and_no_leftovers(tiny_qwen, tmp_path, monkeypatch):
    folder = save_adapter(with_adapter(tiny_qwen, ALL, r=4, alpha=8), tmp_path / "ad")
    out = export_gguf_adapter(folder, tmp_path / "out" / "ad.gguf")
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    newer = save_adapter(with_adapter(tiny_qwen, ALL, r=4, alpha=16, seed=2), tmp_path / "ad2")
    real = gguf.GGUFWriter.write_tensors_to_file
    written = []

    def dies_half_way(self, **kwargs):
        # the header, metadata and tensor index are on disk; now die in the middle of the data
        self.write_ti_data_to_file()
        self.fout[0].write(b"\0" * 100)
        written.append(self.fout[0].tell())
        raise RuntimeError("killed half-way")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", dies_half_way)
    with pytest.raises(RuntimeError, match="half-way"):
        export_gguf_adapter(newer, out)
    with pytest.raises(RuntimeError, match="half-way"):
        export_gguf_adapter(newer, tmp_path / "out" / "new.gguf")
    assert written and written[0] > 100  # it did write a part of a file
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before  # nothing else there
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", real)
    export_gguf_adapter(newer, out)
    assert read(out)[0]["adapter.lora.alpha"] == 16.0


# ---- the command -------------------------------------------------------------------------------
def test_cli_export_gguf_writes_the_file_and_refuses_in_one_line(tiny_qwen, tmp_path, capsys):
    folder = save_adapter(with_adapter(tiny_qwen, ["q_proj", "v_proj"], r=4, alpha=8), tmp_path / "ad")
    assert main(["export", "gguf", str(folder), "--out", str(tmp_path / "ad.gguf"), "--dtype", "f16"]) == 0
    assert f"wrote {tmp_path / 'ad.gguf'}" in capsys.readouterr().out
    assert read(tmp_path / "ad.gguf")[1]["blk.0.attn_q.weight.lora_a"][0] == "F16"
    assert (tmp_path / "ad.Modelfile").is_file()
    dora = save_adapter(with_adapter(tiny_qwen, ["q_proj"], r=4, alpha=8, use_dora=True), tmp_path / "dora")
    assert main(["export", "gguf", str(dora), "--out", str(tmp_path / "d.gguf")]) == 2
    assert capsys.readouterr().err.startswith("error: export_gguf_adapter: ")
    assert main(["export", "gguf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "n.gguf")]) == 2
    assert "nowhere" in capsys.readouterr().err
    # --write-base: the base first, then the adapter checked against it and named in the Modelfile
    base = tmp_path / "base" / "tiny.gguf"
    assert main(["export", "gguf", str(folder), "--out", str(tmp_path / "b.gguf"), "--base-gguf",
                 str(base), "--write-base", "tiny-qwen2", "--base-dtype", "bf16"]) == 0
    assert read(base)[1]["blk.0.attn_q.weight"][0] == "BF16"
    assert f"FROM {base.resolve()}\n" in (tmp_path / "b.Modelfile").read_text()
    assert main(["export", "gguf", str(folder), "--out", str(tmp_path / "c.gguf"),
                 "--write-base", "tiny-qwen2"]) == 2
    assert "--write-base needs --base-gguf" in capsys.readouterr().err


# ---- the base model as a GGUF file ------------------------------------------------------------
def test_base_gguf_reads_back_into_transformers_with_equal_logits(tiny_qwen, tiny_llama, tmp_path):
    """transformers' own GGUF loader (which undoes llama.cpp's Llama q/k order) gives back the
    same model, logits bit for bit, from our F32 file, for both architectures."""
    from transformers import AutoModelForCausalLM

    from loracore.gguf_base import export_gguf_base
    from loracore.models import byte_tokenizer

    ids = torch.tensor([[5, 17, 99, 42, 7, 3]])
    for model, arch in ((tiny_qwen, "qwen2"), (tiny_llama, "llama")):
        path = export_gguf_base(model, byte_tokenizer(), tmp_path / f"{arch}.gguf", dtype="f32")
        fields, tensors = read(path)
        assert (fields["general.type"], fields["general.architecture"]) == ("model", arch)
        assert fields[f"{arch}.attention.head_count_kv"] == 2 and fields["tokenizer.ggml.model"] == "gpt2"
        assert ("output.weight" in tensors) == (not model.config.tie_word_embeddings)
        again = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
        with torch.no_grad():
            assert torch.equal(again(ids).logits, model(ids).logits), arch


def test_base_gguf_half_types_and_refusals(tiny_qwen, tmp_path, monkeypatch):
    from loracore.gguf_base import export_gguf_base
    from loracore.models import byte_tokenizer

    _, tensors = read(export_gguf_base(tiny_qwen, byte_tokenizer(), tmp_path / "bf16.gguf", dtype="bf16"))
    assert tensors["blk.0.attn_q.weight"][0] == "BF16" and tensors["blk.0.attn_q.bias"][0] == "F32"
    assert np.array_equal(tensors["token_embd.weight"][2],
                          tiny_qwen.model.embed_tokens.weight.detach().bfloat16().float().numpy())
    with pytest.raises(ValueError, match="LoRA layers"):
        export_gguf_base(with_adapter(tiny_qwen, ["q_proj"], r=2, alpha=4), byte_tokenizer(), tmp_path / "l.gguf")
    with pytest.raises(ValueError, match="Linear is not one of"):
        export_gguf_base(nn.Linear(2, 2), byte_tokenizer(), tmp_path / "l.gguf")
    assert not (tmp_path / "l.gguf").exists()
    before = (tmp_path / "bf16.gguf").read_bytes()
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file",
                        lambda self, **kw: (_ for _ in ()).throw(RuntimeError("killed half-way")))
    with pytest.raises(RuntimeError, match="half-way"):
        export_gguf_base(tiny_qwen, byte_tokenizer(), tmp_path / "bf16.gguf", dtype="f16")
    assert (tmp_path / "bf16.gguf").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16.gguf"]


def smollm2_or_skip():
    from loracore.models import BaseModelError, smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
        model, tokenizer = load_base_model("smollm2-135m", verbose=False)
    except BaseModelError as exc:
        pytest.skip(f"the offline SmolLM2 is not available: {exc}")
    return path, model, tokenizer


@pytest.mark.slow
def test_smollm2_base_equals_the_file_llama_cpps_converter_made(tmp_path):
    """The course's SmolLM2 ships as a GGUF made by llama.cpp's converter (Q4_1); loracore's
    model is its dequantized copy. Written back, every tensor equals the shipped one
    dequantized (q/k reordering included) and the tokenizer metadata is the same."""
    shipped, model, tokenizer = smollm2_or_skip()
    from loracore.gguf_base import export_gguf_base

    ours = gguf.GGUFReader(export_gguf_base(model, tokenizer, tmp_path / "smol.gguf", dtype="f32"))
    theirs = gguf.GGUFReader(shipped)
    mine = {t.name: t for t in ours.tensors}
    assert set(mine) == {t.name for t in theirs.tensors}
    for t in theirs.tensors:
        assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type).reshape(mine[t.name].data.shape),
                              mine[t.name].data), t.name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.pre", "tokenizer.chat_template", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token", "llama.rope.freq_base",
                "llama.context_length", "llama.attention.head_count_kv", "llama.rope.dimension_count"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key


# ---- llama.cpp itself ---------------------------------------------------------------------------
# Skipped without llama-cpp-python, which builds llama.cpp from source (minutes; a C++ compiler):
#     pip install "llama-cpp-python==0.3.36"   (CPU build; the lead runs these tests)
QUESTIONS = 8
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def smollm2_with_adapter(tmp_path_factory):
    """SmolLM2-135M with a seeded, non-zero LoRA on every linear layer, its adapter exported
    to GGUF, the course's capital questions and loracore's greedy answers to them."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                    "(pip install llama-cpp-python builds llama.cpp; minutes)")
    from loracore.data import load_chat_jsonl
    from loracore.evaluate import generate_ids

    shipped, model, tokenizer = smollm2_or_skip()
    torch.manual_seed(0)  # lora_A's initialisation: the same adapter whatever ran before
    inject(model, ALL, r=8, lora_alpha=16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lay in lora_layers(model).values():
            w = lay.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.01)
    tmp = tmp_path_factory.mktemp("llama_cpp")
    adapter = export_gguf_adapter(save_adapter(model, tmp / "ad"), tmp / "ad.gguf", base_gguf=shipped)
    data = Path(__file__).resolve().parent.parent / "data" / "capitals_test.jsonl"
    questions = [row["messages"] for row in load_chat_jsonl(data, limit=QUESTIONS)]
    ours = generate_ids(model, tokenizer, questions, max_new_tokens=NEW_TOKENS)
    return llama_cpp, shipped, model, tokenizer, adapter, questions, ours, tmp


def llama_cpp_answers(llm, tokenizer, questions, eos_ids) -> list[list[int]]:
    """Greedy replies of llama.cpp to the same prompt tokens loracore saw (no tokenizer of its own
    involved), up to and including the end-of-turn token, at most NEW_TOKENS."""
    from loracore.data import prompt_text

    replies = []
    for conv in questions:
        prompt = tokenizer(prompt_text(tokenizer, conv), add_special_tokens=False)["input_ids"]
        reply = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
            reply.append(token)
            if token in eos_ids or len(reply) == NEW_TOKENS:
                break
        replies.append(reply)
    return replies


def last_logits(llm, prompt: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(prompt)
    return np.array(llm.scores[len(prompt) - 1], dtype=np.float64)


def test_llama_cpp_on_our_f32_base_answers_exactly_like_loracore(smollm2_with_adapter):
    """Base and adapter both exported by loracore in F32: llama.cpp computes what loracore does
    (up to the order of float sums), so every greedy answer must be the same."""
    llama_cpp, _, model, tokenizer, adapter, questions, ours, tmp = smollm2_with_adapter
    from loracore.data import prompt_text
    from loracore.gguf_base import export_gguf_base
    from loracore.surgery import remove_lora

    plain = remove_lora(copy.deepcopy(model))  # the base's own weights, bit for bit
    base = export_gguf_base(plain, tokenizer, tmp / "base-f32.gguf", dtype="f32")
    llm = llama_cpp.Llama(model_path=str(base), lora_path=str(adapter), n_ctx=256, n_threads=1,
                          logits_all=True, verbose=False)
    theirs = llama_cpp_answers(llm, tokenizer, questions, {tokenizer.eos_token_id})
    print(f"llama.cpp (our F32 base + GGUF adapter) vs loracore: "
          f"{sum(a == b for a, b in zip(ours, theirs))}/{len(questions)} greedy answers equal")
    assert theirs == ours
    prompt = tokenizer(prompt_text(tokenizer, questions[0]), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0, -1].double().numpy()
    assert np.abs(last_logits(llm, prompt) - expected).max() < 1e-2


def test_llama_cpp_on_the_shipped_q4_base_adds_no_gap_of_the_adapters_own(smollm2_with_adapter):
    """The course's own SmolLM2 GGUF (Q4_1 layers, a Q8_0 embedding) plus an adapter. loracore
    holds those weights dequantized and computes in float32; llama.cpp computes each quantized
    product in ggml's own arithmetic (for Q4_1, the activations rounded to 8 bits), so
    the base alone already differs from loracore by a logit gap ``g0`` and some greedy answers
    part (measured: 5 or 6 of 8 equal). The adapter must add no gap of its own: with it the gap
    stays of the base's size while the adapter moves loracore's logits by several ``g0``, and
    the same adapter with B·A doubled (standing for a wrong export) opens a gap far above.

    Comparing the adapter's *shift* (with minus without) across the two programs is not a test
    on a quantized base: each of llama.cpp's two runs carries its own rounding noise, redrawn
    when the activations change, and their difference does not cancel (measured: shift cosines
    0.01-0.88 for adapters that the F32 test above finds exact)."""
    llama_cpp, shipped, model, tokenizer, fixture_adapter, questions, answers, tmp = smollm2_with_adapter
    from loracore.data import prompt_text
    from loracore.surgery import disable_adapters

    strong = copy.deepcopy(model)  # B five times the fixture's: its shift must stand far above g0
    with torch.no_grad():
        for lay in lora_layers(strong).values():
            lay.lora_B["default"].weight.mul_(5)
    folder = save_adapter(strong, tmp / "strong")
    adapter = export_gguf_adapter(folder, tmp / "strong.gguf", base_gguf=shipped)
    twice = copy.deepcopy(strong)  # stands for a wrong export: every B·A applied twice over
    with torch.no_grad():
        for lay in lora_layers(twice).values():
            lay.lora_B["default"].weight.mul_(2)
    wrong = export_gguf_adapter(save_adapter(twice, tmp / "twice"), tmp / "twice.gguf", base_gguf=shipped)
    del twice

    def llama(lora: Path | None):
        kwargs = {"lora_path": str(lora)} if lora else {}
        return llama_cpp.Llama(model_path=str(shipped), n_ctx=256, n_threads=1, logits_all=True,
                               verbose=False, **kwargs)

    prompts = [tokenizer(prompt_text(tokenizer, q), add_special_tokens=False)["input_ids"]
               for q in questions[:4]]

    def ours(m: nn.Module, prompt: list[int]) -> np.ndarray:
        with torch.no_grad():
            return m(torch.tensor([prompt])).logits[0, -1].double().numpy()

    def gaps(llm, m: nn.Module) -> np.ndarray:
        return np.array([np.linalg.norm(last_logits(llm, p) - ours(m, p)) for p in prompts])

    with disable_adapters(strong):
        g0 = gaps(llama(None), strong)
        without = [ours(strong, p) for p in prompts]
    shift = np.array([np.linalg.norm(ours(strong, p) - w) for p, w in zip(prompts, without)])
    g = gaps(llama(adapter), strong)
    g_wrong = gaps(llama(wrong), strong)
    print(f"llama.cpp on the Q4_1 base vs loracore, logit gap per prompt: base alone {np.round(g0, 1)}, "
          f"with the adapter {np.round(g, 1)} (the adapter's own shift {np.round(shift, 1)}), "
          f"with the wrongly scaled export {np.round(g_wrong, 1)}")
    theirs = llama_cpp_answers(llama(fixture_adapter), tokenizer, questions, {tokenizer.eos_token_id})
    print(f"the fixture's adapter on the Q4_1 base: {sum(a == b for a, b in zip(answers, theirs))}"
          f"/{len(questions)} greedy answers equal to loracore's (measured, not asserted: see above)")
    # means over the prompts (measured: g0 31.9, g 45.3, the shift 122, the wrong export 150)
    assert shift.mean() > 3 * g0.mean()  # the adapter matters: a wrong one could not hide in g0
    assert g.mean() < 2 * g0.mean()
    assert g_wrong.mean() > 3 * g0.mean()
