"""Hostile inputs to quantization, data loading and training (issue 16, second half).

Each case asserts two things: the error names the cause (the function, the layer, the file
and line, the key), and nothing was changed where something could have been: the model's
modules, weights and ``requires_grad`` after a refused ``quantize_model``; the LoRA weights,
training mode and RNG state after a refused ``train``; the bytes of a data file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from loracore import qlora
from loracore.data import (
    DataError,
    collate,
    load_chat_jsonl,
    load_sft_dataset,
    make_dataloader,
    pad_token_id,
)
from loracore.evaluate import answer_loss, generate_answers
from loracore.models import load_base_model
from loracore.nf4 import (
    NF4Tensor,
    dequantize_nf4,
    dequantize_nf4_reference,
    nf4_code,
    quantize_nf4,
)
from loracore.qlora import Linear4bit, quantize_model
from loracore.surgery import inject
from loracore.train import lr_schedule, train

DATA = Path(__file__).resolve().parent.parent / "data"


# ---- helpers ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base():
    """The tiny random Qwen2 and its tokenizer, loaded once; tests work on deep copies."""
    return load_base_model("tiny-qwen2", verbose=False)


@pytest.fixture
def model(base):
    return copy.deepcopy(base[0])


def snapshot(model: nn.Module) -> dict:
    """Everything a half-applied operation could change: which module object sits at each
    name, every tensor's values, and every parameter's requires_grad."""
    return {
        "modules": {n: (type(m), id(m)) for n, m in model.named_modules()},
        "tensors": {n: t.detach().clone() for n, t in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": model.training,
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for n, t in before["tensors"].items():
        assert torch.equal(after["tensors"][n], t) or (t.isnan().any() and torch.allclose(
            after["tensors"][n], t, equal_nan=True)), n


LINEAR_NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                "model.layers.1.mlp.down_proj"]


# ---- quantize_model: all or nothing -------------------------------------------------------
@pytest.mark.parametrize("layer", LINEAR_NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_model_refuses_a_non_finite_layer_before_converting_any(model, layer, bad):
    with torch.no_grad():
        model.get_submodule(layer).weight[1, 2] = bad
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"quantize_model: layer '{layer}' has 1 non-finite"):
        quantize_model(model)
    assert_unchanged(model, before)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())


def test_quantize_model_failure_in_the_third_quantization_leaves_the_model_whole(model, monkeypatch):
    calls = []
    real = Linear4bit.from_linear.__func__

    def failing(cls, linear, **kw):
        calls.append(linear)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real(cls, linear, **kw)

    monkeypatch.setattr(Linear4bit, "from_linear", classmethod(failing))
    before = snapshot(model)
    third = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"][2]
    with pytest.raises(RuntimeError, match=rf"quantize_model: layer '{third}': injected failure; "
                                           r"nothing was quantized"):
        quantize_model(model)
    assert len(calls) == 3
    assert_unchanged(model, before)
    monkeypatch.undo()
    quantize_model(model)  # and a retry works on the untouched model
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) > 3


def test_quantize_model_failure_while_swapping_puts_every_layer_back(model, monkeypatch):
    calls = []
    real = qlora._swap

    def failing(parent, child, module):
        calls.append(child)
        if len(calls) == 3:
            raise RuntimeError("injected swap failure")
        real(parent, child, module)

    monkeypatch.setattr(qlora, "_swap", failing)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="injected swap failure"):
        quantize_model(model)
    assert len(calls) == 3  # two layers had been swapped in: both must be back
    assert_unchanged(model, before)


# ---- quantize_model: skip -----------------------------------------------------------------
@pytest.mark.parametrize("skip", ["lm_head", ["lm_head"], ("lm_head",), {"lm_head"}])
def test_skip_one_string_is_one_name(model, skip):
    quantize_model(model, skip=skip)
    assert type(model.lm_head) is nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)


def test_skip_a_list_of_last_names_and_full_names(model):
    quantize_model(model, skip=["lm_head", "down_proj", "model.layers.0.self_attn.q_proj"])
    assert type(model.lm_head) is nn.Linear
    assert all(type(layer.mlp.down_proj) is nn.Linear for layer in model.model.layers)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert isinstance(model.model.layers[1].self_attn.q_proj, Linear4bit)


@pytest.mark.parametrize("skip, exc, message", [
    (["lm_haed"], ValueError, r"skip names \['lm_haed'\], which match no nn.Linear"),
    ("down_prj", ValueError, r"skip names \['down_prj'\]"),
    ([3], TypeError, "skip holds 3; every entry must be a non-empty layer name"),
    ([""], TypeError, "skip holds ''"),
    (5, TypeError, "skip must be a layer name or a list of names, got int"),
])
def test_skip_bad_names_are_refused_and_change_nothing(model, skip, exc, message):
    before = snapshot(model)
    with pytest.raises(exc, match=message):
        quantize_model(model, skip=skip)
    assert_unchanged(model, before)


# ---- quantize_model / Linear4bit: arguments -----------------------------------------------
@pytest.mark.parametrize("kwargs, exc, message", [
    ({"compute_dtype": torch.int8}, TypeError, r"quantize_model: compute_dtype must be torch.float32.*torch.int8"),
    ({"compute_dtype": "float16"}, TypeError, r"quantize_model: compute_dtype .* got 'float16' \(str\)"),
    ({"compute_dtype": torch.float64}, TypeError, r"quantize_model: compute_dtype .*torch.float64"),
    ({"blocksize": 48}, ValueError, "quantize_model: blocksize must be a power of two"),
    ({"blocksize": True}, ValueError, "quantize_model: blocksize must be a power of two"),
    ({"double_quant": "yes"}, TypeError, "quantize_model: double_quant must be True or False"),
])
def test_quantize_model_bad_arguments_change_nothing(model, kwargs, exc, message):
    before = snapshot(model)
    with pytest.raises(exc, match=message):
        quantize_model(model, **kwargs)
    assert_unchanged(model, before)


def test_quantize_model_refuses_a_float64_layer_by_name(model):
    model.model.layers[1].mlp.gate_proj.double()
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"layer 'model.layers.1.mlp.gate_proj' has weight dtype "
                                        r"torch.float64.*model.float\(\)"):
        quantize_model(model)
    assert_unchanged(model, before)


def test_quantize_model_refuses_a_model_with_lora_and_changes_nothing(model):
    inject(model, ["q_proj"], r=2, lora_alpha=4)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has LoRA layers; quantize the base model first"):
        quantize_model(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("compute_dtype", [torch.int32, "float32", torch.float64, 32])
def test_linear4bit_refuses_a_compute_dtype_that_is_not_a_float_dtype(compute_dtype):
    lin = nn.Linear(64, 8)
    with pytest.raises(TypeError, match=r"Linear4bit.from_linear: compute_dtype must be"):
        Linear4bit.from_linear(lin, compute_dtype=compute_dtype)
    with pytest.raises(TypeError, match=r"Linear4bit: compute_dtype must be"):
        Linear4bit(quantize_nf4(lin.weight.detach()), compute_dtype=compute_dtype)


# ---- NF4: huge and non-finite values ------------------------------------------------------
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("huge", [1e38, 3e38, 3.4e38, -3.4e38])
def test_huge_finite_values_quantize_to_finite_values(huge, double_quant):
    """Before: values near the float32 limit overflowed the mean of the block constants and
    quantize_nf4 died with an index overflow (bitsandbytes returns NaN there)."""
    w = torch.randn(6, 128, generator=torch.Generator().manual_seed(0))
    w[0, 0], w[3, 7], w[5, 100] = huge, -huge, huge / 2
    q = quantize_nf4(w, double_quant=double_quant)
    d = dequantize_nf4(q)
    assert torch.isfinite(d).all()
    for idx in [(0, 0), (3, 7)]:  # the largest value of a block is stored exactly (code ±1)
        assert math.isclose(d[idx].item(), w[idx].item(), rel_tol=1e-2)
    assert torch.equal(dequantize_nf4_reference(q), d)


def test_mixed_huge_and_tiny_blocks_without_double_quant_keep_each_blocks_scale():
    """One absmax per block in float32: a block of 1e-30s is not crushed by a block of 1e38s."""
    g = torch.Generator().manual_seed(1)
    w = torch.cat([torch.randn(64, generator=g) * 1e38 / 4, torch.randn(64, generator=g) * 1e-30,
                   torch.randn(64, generator=g)])
    d = dequantize_nf4(quantize_nf4(w, double_quant=False))
    code = nf4_code()
    bound = (code[1:] - code[:-1]).max().item() / 2 * 1.001  # half the widest gap, times absmax
    for block in range(3):
        x, y = w[block * 64:(block + 1) * 64], d[block * 64:(block + 1) * 64]
        assert ((x - y).abs().max() / x.abs().max()).item() <= bound, block


@pytest.mark.parametrize("bad, name", [(float("nan"), "nan"), (float("inf"), "inf"),
                                       (-float("inf"), "-inf")])
def test_quantize_nf4_refuses_non_finite_naming_the_block(bad, name):
    w = torch.zeros(300)
    w[200] = bad
    with pytest.raises(ValueError, match=r"quantize_nf4: .*non-finite values \(first in block 3"):
        quantize_nf4(w)


# ---- NF4: a tampered NF4Tensor is refused before decoding ---------------------------------
def _tamper(q: NF4Tensor, how: str) -> NF4Tensor:
    r = dataclasses.replace
    return {
        "shape larger": lambda: r(q, shape=torch.Size((40, 200))),
        "shape empty": lambda: r(q, shape=torch.Size((0, 96))),
        "shape negative": lambda: r(q, shape=(-40, 96)),
        "shape of floats": lambda: r(q, shape=(40.0, 96)),
        "blocksize not a power of two": lambda: r(q, blocksize=48),
        "blocksize changed": lambda: r(q, blocksize=128),
        "packed truncated": lambda: r(q, packed=q.packed[:-1]),
        "packed int32": lambda: r(q, packed=q.packed.int()),
        "absmax truncated": lambda: r(q, absmax=q.absmax[:-1]),
        "absmax float (double quant)": lambda: r(q, absmax=q.absmax.float()),
        "absmax2 missing": lambda: r(q, absmax2=None),
        "absmax2 wrong length": lambda: r(q, absmax2=torch.ones(3)),
        "offset float64": lambda: r(q, offset=q.offset.double()),
        "dtype int": lambda: r(q, dtype=torch.int8),
        "dtype string": lambda: r(q, dtype="float32"),
        "parts on two devices": lambda: r(q, absmax=q.absmax.to("meta")),
    }[how]()


TAMPERS = {
    "shape larger": "packed holds 1920 bytes; shape \\(40, 200\\) needs",
    "shape empty": "shape \\(0, 96\\) holds no values",
    "shape negative": "holds no values",
    "shape of floats": "shape must be a sequence of ints",
    "blocksize not a power of two": "blocksize must be a power of two",
    "blocksize changed": "absmax holds 60 constants; 3840 values in blocks of 128 need 30",
    "packed truncated": "packed holds 1919 bytes",
    "packed int32": "packed must be a 1-D uint8 tensor",
    "absmax truncated": "absmax holds 59 constants",
    "absmax float (double quant)": "absmax must be a 1-D torch.uint8 tensor \\(double quantization\\)",
    "absmax2 missing": "offset and absmax2 must be both set",
    "absmax2 wrong length": "absmax2 has shape \\(3,\\)",
    "offset float64": "offset must be a float32 tensor",
    "dtype int": "dtype must be float32, bfloat16 or float16, got torch.int8",
    "dtype string": "dtype must be float32, bfloat16 or float16, got 'float32'",
    "parts on two devices": "on different devices",
}


@pytest.mark.parametrize("how", list(TAMPERS))
def test_tampered_nf4tensor_is_refused_before_decoding(how):
    q = quantize_nf4(torch.randn(40, 96, generator=torch.Generator().manual_seed(2)))
    bad = _tamper(q, how)
    for fn, name in ((dequantize_nf4, "dequantize_nf4"),
                     (dequantize_nf4_reference, "dequantize_nf4_reference"),
                     (Linear4bit, "Linear4bit")):
        with pytest.raises((ValueError, TypeError), match=rf"{name}: inconsistent NF4Tensor: "
                                                          rf".*{TAMPERS[how]}"):
            fn(bad)


def test_tampered_buffers_of_a_linear4bit_are_refused_at_forward():
    layer = Linear4bit.from_linear(nn.Linear(96, 40))
    layer.weight_absmax = layer.weight_absmax[:-2]  # e.g. a state dict from another blocksize
    with pytest.raises(ValueError, match="dequantize_nf4: inconsistent NF4Tensor: absmax holds"):
        layer(torch.randn(2, 96))


def test_non_finite_block_constants_are_refused_by_linear4bit():
    q = quantize_nf4(torch.randn(8, 64), double_quant=False)
    q.absmax[0] = float("nan")
    with pytest.raises(ValueError, match="Linear4bit: inconsistent NF4Tensor: .*hold NaN or inf"):
        Linear4bit(q)


@pytest.mark.parametrize("dtype", [torch.int32, "float32"])
def test_dequantize_refuses_a_non_float_output_dtype(dtype):
    q = quantize_nf4(torch.randn(8, 64))
    for fn in (dequantize_nf4, dequantize_nf4_reference):
        with pytest.raises(TypeError, match=f"{fn.__name__}: dtype must be float32"):
            fn(q, dtype)


# ---- data files ---------------------------------------------------------------------------
def chat_line(q: str = "Capital of France?", a: str = "Paris") -> str:
    return json.dumps({"messages": [{"role": "user", "content": q},
                                    {"role": "assistant", "content": a}]})


@pytest.fixture
def good_file(tmp_path) -> Path:
    path = tmp_path / "good.jsonl"
    path.write_text("\n".join(chat_line(f"q{i}", f"a{i}") for i in range(3)) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("limit", [0, -1, 1.5, 2.0, True, "3"])
def test_load_chat_jsonl_refuses_a_limit_that_is_not_a_positive_int(good_file, limit):
    with pytest.raises(DataError, match=rf"load_chat_jsonl: limit must be a positive integer, "
                                        rf"got {limit!r}"):
        load_chat_jsonl(good_file, limit=limit)


def test_load_chat_jsonl_limit_one_and_none(good_file):
    assert len(load_chat_jsonl(good_file, limit=1)) == 1
    assert len(load_chat_jsonl(good_file, limit=10)) == len(load_chat_jsonl(good_file)) == 3


@pytest.mark.parametrize("raw, what", [
    ("Caf\xe9".encode("latin-1"), rb"b'\\xe9'"),   # Latin-1 text
    (b"\xff\xfe", rb"b'\\xff'"),                   # a UTF-16 byte-order mark
    (b"\xed\xa0\x80", rb"b'\\xed'"),               # a surrogate encoded as UTF-8 (CESU-8)
])
def test_bytes_that_are_not_utf8_are_named_by_file_and_line(tmp_path, raw, what):
    path = tmp_path / "mixed.jsonl"
    line3 = b'{"messages": [{"role": "user", "content": "' + raw + \
            b'"}, {"role": "assistant", "content": "x"}]}'
    data = (chat_line() + "\n\n").encode() + line3 + b"\n" + chat_line().encode() + b"\n"
    path.write_bytes(data)
    with pytest.raises(DataError, match=r"mixed\.jsonl:3: not UTF-8 text \(byte \d+ of the line "
                                        r"is " + what.decode() + r"\); save the file as UTF-8"):
        load_chat_jsonl(path)
    assert path.read_bytes() == data  # reading never rewrites the file


@pytest.mark.parametrize("content", ["\\ud800", "ok \\udfff", "\\udc00\\ud800"])
def test_lone_surrogate_escapes_are_named_by_file_and_line(tmp_path, content):
    path = tmp_path / "surrogates.jsonl"
    bad = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "%s"}]}'
    path.write_text(chat_line() + "\n" + bad % content + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"surrogates\.jsonl:2: messages\[1\]\['content'\] "
                                        r".*lone surrogate"):
        load_chat_jsonl(path)


def test_a_valid_surrogate_pair_and_a_byte_order_mark_are_fine(tmp_path):
    path = tmp_path / "ok.jsonl"
    pair = chat_line("emoji?", "\\ud83d\\ude00").replace("\\\\", "\\")
    path.write_bytes(b"\xef\xbb\xbf" + (chat_line() + "\n" + pair + "\n").encode())
    ds = load_chat_jsonl(path)
    assert len(ds) == 2 and ds[1]["messages"][1]["content"] == "\U0001F600"


@pytest.mark.parametrize("line, message", [
    ('{"messages": [', r"broken\.jsonl:2: not valid JSON \(Expecting value, column 15\)"),
    ("[1, 2]", r"broken\.jsonl:2: each line must be a JSON object, got list"),
    ('{"msgs": []}', r"broken\.jsonl:2: missing the field 'messages'"),
    ("[" * 100000 + "]" * 100000, r"broken\.jsonl:2: (JSON nested too deeply|not valid JSON)"),
])
def test_broken_lines_are_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "broken.jsonl"
    path.write_text(chat_line() + "\n" + line + "\n" + chat_line() + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_chat_jsonl(path)


def test_a_folder_is_not_a_file(tmp_path):
    with pytest.raises(DataError, match="load_chat_jsonl: .* is a folder; pass the .jsonl file"):
        load_chat_jsonl(tmp_path)


# ---- batches ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenized(base):
    return load_sft_dataset(DATA / "capitals_train.jsonl", base[1], max_length=128, limit=4)


@pytest.mark.parametrize("batch_size", [0, -2, 2.0, True, None])
def test_make_dataloader_refuses_a_batch_size_that_is_not_a_positive_int(base, tokenized, batch_size):
    with pytest.raises(DataError, match=rf"make_dataloader: batch_size must be a positive integer, "
                                        rf"got {batch_size!r}"):
        make_dataloader(tokenized, base[1], batch_size=batch_size)


@pytest.mark.parametrize("max_length", [0, 64.0])
def test_tokenize_chat_refuses_a_max_length_that_is_not_a_positive_int(base, good_file, max_length):
    with pytest.raises(DataError, match=rf"tokenize_chat: max_length must be a positive integer, "
                                        rf"got {max_length!r}"):
        load_sft_dataset(good_file, base[1], max_length=max_length)


def test_collate_names_a_missing_key():
    with pytest.raises(DataError, match=r"collate: example 1 has no \['labels'\]"):
        collate([{"input_ids": [1], "labels": [1]}, {"input_ids": [1, 2]}], pad_id=0)


def _batch(base, tokenized) -> dict:
    return collate(tokenized.select(range(2)), pad_token_id(base[1]))


def _lora(base) -> nn.Module:
    m = copy.deepcopy(base[0])
    torch.manual_seed(0)
    inject(m, ["q_proj", "v_proj"], r=2, lora_alpha=4)
    return m


@pytest.mark.parametrize("change, message", [
    (lambda b: b.pop("attention_mask"), r"the batch has no 'attention_mask' \(the 1s over real "
                                        r"tokens.*it has \['input_ids', 'labels'\]"),
    (lambda b: b.pop("labels"), r"the batch has no 'labels'"),
    (lambda b: b.update(labels=b["labels"].float()), r"batch\['labels'\] must be a 2-D integer tensor"),
    (lambda b: b.update(attention_mask=b["attention_mask"][:, :-1]),
     r"batch\['attention_mask'\] has shape \(2, \d+\) but input_ids has"),
    (lambda b: b.update(input_ids=b["input_ids"].tolist()), r"batch\['input_ids'\] must be a 2-D"),
])
def test_a_bad_batch_is_named_by_train_and_answer_loss(base, tokenized, change, message):
    batch = _batch(base, tokenized)
    change(batch)
    model = _lora(base)
    before = snapshot(model)
    with pytest.raises(DataError, match=r"train: step 0, micro-batch 0: " + message):
        train(model, [batch], num_steps=2, progress=False)
    model.train(before["training"])  # train() always leaves eval mode; compare the rest
    assert_unchanged(model, before)  # the first micro-batch is checked before any update
    with pytest.raises(DataError, match=r"answer_loss: batch 0: " + message):
        answer_loss(model, [batch])


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "generate_ids: batch_size must be a positive integer, got 0"),
    ({"max_new_tokens": 2.0}, "generate_ids: max_new_tokens must be a positive integer, got 2.0"),
])
def test_generation_refuses_zero_batch_size_and_float_token_counts(base, kwargs, message):
    with pytest.raises(DataError, match=message):
        generate_answers(base[0], base[1], [[{"role": "user", "content": "hi"}]], **kwargs)


def test_a_batch_that_is_not_a_dict(base):
    with pytest.raises(DataError, match=r"train: step 0, micro-batch 0: a batch must be a dict"):
        train(_lora(base), [torch.zeros(2, 3)], num_steps=1, progress=False)


# ---- train: arguments are checked before anything changes ---------------------------------
@pytest.mark.parametrize("kwargs, exc, message", [
    ({"max_grad_norm": -1.0}, ValueError, r"train \(None skips clipping\): max_grad_norm must be "
                                          r"a finite number > 0, got -1.0"),
    ({"max_grad_norm": 0}, ValueError, "max_grad_norm must be a finite number > 0, got 0"),
    ({"max_grad_norm": float("nan")}, ValueError, "max_grad_norm must be a finite number > 0"),
    ({"max_grad_norm": float("inf")}, ValueError, "max_grad_norm must be a finite number > 0"),
    ({"num_steps": 10.0}, TypeError, r"train: num_steps must be an int, got 10.0 \(float\); "
                                     r"round it on purpose, e.g. int\(10.0\)"),
    ({"num_steps": 2.5}, TypeError, r"train: num_steps must be an int, got 2.5"),
    ({"num_steps": True}, TypeError, r"train: num_steps must be an int, got True \(bool\)"),
    ({"num_steps": "3"}, TypeError, r"train: num_steps must be an int, got '3' \(str\)"),
    ({"num_steps": -2}, ValueError, "train: num_steps and grad_accum_steps must be >= 1"),
    ({"grad_accum_steps": 2.0}, TypeError, r"train: grad_accum_steps must be an int, got 2.0"),
    ({"grad_accum_steps": 0}, ValueError, "num_steps and grad_accum_steps must be >= 1, got 2 and 0"),
    ({"grad_accum_steps": False}, TypeError, r"train: grad_accum_steps must be an int, got False"),
    ({"lr": 0.0}, ValueError, "train: lr must be a finite number > 0, got 0.0"),
    ({"lr": -1e-3}, ValueError, "train: lr must be a finite number > 0, got -0.001"),
    ({"lr": float("nan")}, ValueError, "train: lr must be a finite number > 0, got nan"),
    ({"lr": float("inf")}, ValueError, "train: lr must be a finite number > 0, got inf"),
    ({"lr": "1e-3"}, ValueError, "train: lr must be a finite number > 0, got '1e-3'"),
    ({"weight_decay": -0.1}, ValueError, "train: weight_decay must be a finite number >= 0"),
    ({"loraplus_lr_ratio": float("nan")}, ValueError, "train: loraplus_lr_ratio must be a finite"),
    ({"warmup_steps": 1.5}, TypeError, r"lr_schedule: warmup_steps must be an int, got 1.5"),
    ({"warmup_steps": 5}, ValueError, "lr_schedule: need 0 <= warmup_steps <= num_steps"),
    ({"schedule": "cosin"}, ValueError, "lr_schedule: kind must be 'cosine'"),
    ({"optimizer": "adam"}, TypeError, "train: optimizer must be a torch.optim.Optimizer, got str"),
])
def test_train_refuses_bad_arguments_before_touching_anything(base, tokenized, kwargs, exc, message):
    model = _lora(base)
    model.train()
    before = snapshot(model)
    rng = torch.get_rng_state()
    args = {"num_steps": 2, **kwargs}
    with pytest.raises(exc, match=message):
        train(model, [_batch(base, tokenized)], progress=False, **args)
    assert_unchanged(model, before)  # not even switched to eval mode
    assert torch.equal(torch.get_rng_state(), rng)  # nor the global RNG seeded


def test_max_grad_norm_none_still_skips_clipping(base, tokenized):
    model = _lora(base)
    result = train(model, [_batch(base, tokenized)], num_steps=1, max_grad_norm=None, progress=False)
    assert len(result.losses) == 1 and math.isfinite(result.losses[0])


def test_lr_schedule_refuses_a_float_step_count():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(TypeError, match=r"lr_schedule: num_steps must be an int, got 10.0"):
        lr_schedule(opt, num_steps=10.0)
