"""A course base model written as a GGUF file for llama.cpp and Ollama (F32, F16 or BF16).

llama.cpp needs the base in GGUF beside the adapter (:mod:`loracore.gguf_export`).
:func:`export_gguf_base` writes a model loaded by :func:`loracore.models.load_base_model` (or
any float Qwen2 / Llama model from transformers) with its tokenizer, as llama.cpp's converter
would lay it out:

- hyperparameters under ``<arch>.*`` (context, widths, heads, rope base, norm epsilon);
- the tokenizer as a GPT-2-style byte-level BPE (tokens, their types, merges, special ids,
  the chat template), so llama.cpp and Ollama tokenize and format chats themselves;
- every weight under llama.cpp's name, 2-D weights in ``dtype``, norms and biases in F32 (as
  llama.cpp's converter keeps them), Llama's q/k rows in llama.cpp's rotary order.

Not bit for bit the converter's file (metadata such as ``general.size_label`` is left out), but
the same tensors and the keys llama.cpp reads. A model with LoRA layers or a 4-bit base is
refused: merge or remove the adapter first; quantize with llama.cpp's ``llama-quantize``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from loracore.atomic import atomic_write_file, disk_write_error
from loracore.gguf_export import ARCHITECTURES, DTYPES, add_tensor, rope_rows_interleaved, write_and_close

__all__ = ["export_gguf_base", "PRE_TOKENIZERS"]

CALLER = "export_gguf_base"
#: llama.cpp's name for the pre-tokenizer (how text is split before BPE) of the course's models:
#: Qwen2's, and SmolLM2's (the course's Llama).
PRE_TOKENIZERS = {"qwen2": "qwen2", "llama": "smollm"}


def _tokenizer_fields(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, arch: str) -> None:
    """The tokenizer as llama.cpp's ``gpt2`` (byte-level BPE) vocabulary."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"{CALLER}: the tokenizer is {spec['model']['type']}, not a byte-level "
                         f"BPE; loracore writes GGUF tokenizers for Qwen2 and SmolLM2 only")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):  # the embedding may have more rows than the tokenizer has tokens
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZERS[arch])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id)):
        if token_id is not None:
            add(token_id)
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _tensors(model: nn.Module, arch: str) -> dict[str, torch.Tensor]:
    """llama.cpp's name -> tensor (as stored, float32), q/k reordered for Llama."""
    config = model.config
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch],
                                     config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads,
             "k_proj": config.num_key_value_heads or config.num_attention_heads}
    out, unmapped = {}, []
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses token_embd as the output when output.weight is absent
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            unmapped.append(key)
            continue
        t = t.detach().to("cpu", torch.float32)
        proj = key.rsplit(".", 2)[-2]
        if arch == "llama" and proj in heads:
            t = rope_rows_interleaved(t.reshape(t.shape[0], -1), heads[proj]).reshape(t.shape)
        out[target] = t.contiguous()
    if unmapped:
        raise ValueError(f"{CALLER}: {unmapped[:4]} have no name in llama.cpp's {arch!r} layout")
    return out


def _check(model: nn.Module) -> str:
    """The model's llama.cpp architecture, after checking it is a plain float model."""
    arch = ARCHITECTURES.get(type(model).__name__)
    if arch is None:
        raise ValueError(f"{CALLER}: {type(model).__name__} is not one of {sorted(ARCHITECTURES)}")
    kinds = {type(m).__name__ for m in model.modules()}
    if "LoRALinear" in kinds:
        raise ValueError(f"{CALLER}: the model has LoRA layers; export the base without them "
                         f"(loracore.surgery.remove_lora, or merge into a copy to ship a merged model)")
    odd = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if odd or "Linear4bit" in kinds:
        raise ValueError(f"{CALLER}: the model has quantized layers ({odd[:2] or 'Linear4bit'}); "
                         f"export the float model and quantize the GGUF with llama-quantize")
    rope = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {}
    scaling = rope.get("rope_type", rope.get("type", "default"))
    if scaling != "default":
        raise ValueError(f"{CALLER}: rope scaling {scaling!r} is not written by loracore")
    return arch


def export_gguf_base(model: nn.Module, tokenizer, out_file: str | os.PathLike, *,
                     dtype: str = "f16", name: str | None = None) -> Path:
    """Write ``model`` (a float Qwen2 or Llama from transformers) and its ``tokenizer`` as a
    GGUF model file ``out_file`` that llama.cpp and Ollama load; 2-D weights in ``dtype``
    (``"f32"``, ``"f16"``, ``"bf16"``). Checked before the disk is touched; the file is
    replaced whole or not at all. Returns its path."""
    if dtype not in DTYPES:
        raise ValueError(f"{CALLER}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    arch = _check(model)
    config = model.config
    tensors = _tensors(model, arch)
    _, _, file_type = DTYPES[dtype]
    if dtype == "f16":
        big = [k for k, t in tensors.items() if t.dim() > 1 and t.abs().max() > np.finfo(np.float16).max]
        if big:
            raise ValueError(f"{CALLER}: {big[:3]} hold values beyond float16's range; use bf16 or f32")
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta",
                                                                 getattr(config, "rope_theta", 10000.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(None, arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or getattr(config, "_name_or_path", "") or type(model).__name__)
        writer.add_file_type(file_type)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
        writer.add_rope_freq_base(float(theta))
        writer.add_rope_dimension_count(head_dim)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        _tokenizer_fields(writer, tokenizer, config.vocab_size, arch)
        for key, t in tensors.items():
            # norms and biases stay float32, as llama.cpp's converter keeps them
            add_tensor(writer, key, t, "f32" if t.dim() == 1 else dtype)
        write_and_close(writer, tmp)

    out = Path(out_file)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise disk_write_error(exc, out, "nothing was written") from None
    atomic_write_file(out, write)
    return out
