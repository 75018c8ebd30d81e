"""An adapter for llama.cpp and Ollama: PEFT's folder written as a GGUF LoRA file.

llama.cpp loads a LoRA adapter from its own GGUF file (``llama-cli -m base.gguf --lora
adapter.gguf``; Ollama's ``ADAPTER`` line reads the same file). :func:`export_gguf_adapter`
writes one from an adapter folder (read with :func:`loracore.adapter_file.read_adapter`):

- metadata ``general.type = "adapter"``, ``adapter.type = "lora"``, ``general.architecture``
  (``"qwen2"``, ``"llama"``: llama.cpp refuses an adapter of another architecture than its
  base) and ``adapter.lora.alpha``;
- per adapted module two tensors named after the base tensor in llama.cpp's names,
  ``blk.0.attn_q.weight.lora_a`` = PEFT's ``lora_A`` ``(r, in)`` and ``...lora_b`` =
  ``lora_B`` ``(out, r)``, stored as they are (GGUF lists dimensions the other way round:
  ``[in, r]`` and ``[r, out]``). llama.cpp adds ``scale * B (A x)`` to the base layer's output
  with ``scale = alpha / r``, r read from each ``lora_b``.

Three things do not carry over as they are, and each is handled here:

- **scaling**: llama.cpp has one ``alpha`` per file and always divides by the rank. rsLoRA's
  ``alpha / sqrt(r)`` is the same number as ``(alpha * sqrt(r)) / r``, so the file gets
  ``alpha * sqrt(r)``; an adapter whose modules need different alphas (an ``alpha_pattern``,
  or rsLoRA with a ``rank_pattern``) cannot be written with one, and is refused;
- **Llama's rotary layout**: Hugging Face's Llama rotates the two halves of each head's query
  and key, llama.cpp's ``llama`` rotates neighbouring pairs, so llama.cpp's converter reorders
  the rows of ``q_proj`` and ``k_proj`` in the base. ``lora_B`` (its rows are those outputs)
  is reordered the same way (:func:`rope_rows_interleaved`); Qwen2 needs nothing;
- **what llama.cpp cannot load** is refused before anything is written: DoRA (no magnitude in
  the format), a module without a GGUF name or that llama.cpp does not adapt, an architecture
  other than Llama and Qwen2, and, given the base GGUF, a module whose tensor is missing or of
  another shape there (llama.cpp's own check, made at export time).

The file is written crash-safe (:func:`loracore.atomic.atomic_write_file`), and beside it an
Ollama ``Modelfile`` (``FROM`` the base, ``ADAPTER`` the file).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from loracore.adapter_file import AdapterFile, read_adapter
from loracore.atomic import atomic_write_file, atomic_write_text, disk_write_error

__all__ = ["export_gguf_adapter", "gguf_lora_tensors", "gguf_alpha", "rope_rows_interleaved",
           "modelfile_text", "BaseInfo", "ARCHITECTURES", "DTYPES"]

CALLER = "export_gguf_adapter"
#: Hugging Face model class -> llama.cpp's architecture name: the course's two families.
ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}  # config.model_type
#: The base tensors llama.cpp's llama and qwen2 graphs multiply through ``build_lora_mm``,
#: the only place it applies an adapter.
ADAPTABLE = {gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K, gguf.MODEL_TENSOR.ATTN_V,
             gguf.MODEL_TENSOR.ATTN_OUT, gguf.MODEL_TENSOR.FFN_GATE, gguf.MODEL_TENSOR.FFN_UP,
             gguf.MODEL_TENSOR.FFN_DOWN, gguf.MODEL_TENSOR.OUTPUT}
#: ``dtype`` name -> (numpy dtype written, GGML type, ``general.file_type``).
DTYPES = {"f32": (np.float32, gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
          "f16": (np.float16, gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
          "bf16": (np.float32, gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16)}


@dataclass(frozen=True)
class BaseInfo:
    """What the export needs to know of the base: llama.cpp's ``arch`` name, the head counts
    (Llama's rotary reordering needs them) and, from a base GGUF, its tensors' shapes in
    GGUF's order (``name -> (in, out)``) to check the adapter against."""
    arch: str
    n_head: int | None = None
    n_head_kv: int | None = None
    shapes: dict[str, tuple[int, ...]] | None = None
    source: str = "the adapter's record"


def rope_rows_interleaved(B: torch.Tensor, n_head: int) -> torch.Tensor:
    """``B`` ``(out, r)`` with the rows of each of ``n_head`` heads reordered from Hugging
    Face's rotary layout (first half, second half) to llama.cpp's (neighbouring pairs).

    Per head of ``d`` rows, row ``j * d/2 + i`` moves to row ``2 * i + j``:
    for ``d = 4``, rows ``[0, 1, 2, 3] -> [0, 2, 1, 3]``. A row permutation of ``B`` is the
    same permutation of ``ΔW = B A``, as llama.cpp's converter applies to ``W``.
    """
    out, r = B.shape
    if out % (2 * n_head):
        raise ValueError(f"{CALLER}: {out} output rows do not split into {n_head} heads of an "
                         f"even size; the head count does not belong to this adapter's base")
    return B.reshape(n_head, 2, out // n_head // 2, r).transpose(1, 2).reshape(out, r)


def gguf_alpha(adapter: AdapterFile) -> float:
    """The one ``adapter.lora.alpha`` for which llama.cpp's ``alpha / r`` gives every module
    PEFT's scaling (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA); ValueError
    naming the modules when no single alpha does."""
    wanted: dict[float, list[str]] = {}
    for name, m in adapter.modules.items():
        alpha = m.lora_alpha * math.sqrt(m.r) if adapter.use_rslora else float(m.lora_alpha)
        wanted.setdefault(float(np.float32(alpha)), []).append(name)  # the file holds a float32
    if len(wanted) > 1:
        groups = "; ".join(f"alpha {a:g} for {names[:2]}{' ...' if len(names) > 2 else ''}"
                           for a, names in sorted(wanted.items()))
        why = ("rsLoRA with modules of different ranks" if adapter.use_rslora
               else "modules with different lora_alpha (alpha_pattern)")
        raise ValueError(f"{CALLER}: {adapter.path} has {why}; llama.cpp scales every module by "
                         f"one alpha / r, and these need {groups}. Export an adapter with one "
                         f"lora_alpha (and, with rsLoRA, one rank), or merge it instead")
    return next(iter(wanted))


def gguf_lora_tensors(adapter: AdapterFile, base: BaseInfo) -> dict[str, torch.Tensor]:
    """llama.cpp's tensors for ``adapter``: ``"<base tensor>.lora_a"`` ``(r, in)`` and
    ``".lora_b"`` ``(out, r)`` per module, float32, in llama.cpp's row order. Every module is
    checked first (a GGUF name llama.cpp adapts; with ``base.shapes``, a tensor of that shape
    in the base) and every problem is reported at once."""
    arch = {name: value for value, name in gguf.MODEL_ARCH_NAMES.items()}[base.arch]
    blocks = [int(p) for n in adapter.modules for p in n.split(".") if p.isdigit()]
    names = gguf.get_tensor_name_map(arch, max(blocks, default=0) + 1)
    problems, out = [], {}
    for module, m in sorted(adapter.modules.items()):
        found = names.get_type_and_name(module + ".weight", try_suffixes=(".weight",))
        if found is None or found[0] not in ADAPTABLE:
            what = "has no tensor name" if found is None else f"is {found[1]!r}, which llama.cpp never adapts"
            problems.append(f"module {module!r} {what} in llama.cpp's {base.arch!r} layout")
            continue
        kind, tensor = found
        out_f, in_f = m.lora_B.shape[0], m.lora_A.shape[1]
        if base.shapes is not None and base.shapes.get(tensor) != (in_f, out_f):
            have = base.shapes.get(tensor)
            problems.append(f"module {module!r}: {tensor} " + ("is not in the base GGUF" if have is None
                            else f"is [in, out] = {list(have)} in the base GGUF, the adapter needs "
                                 f"{[in_f, out_f]}"))
            continue
        B = m.lora_B.float()
        if base.arch == "llama" and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
            heads = base.n_head if kind == gguf.MODEL_TENSOR.ATTN_Q else base.n_head_kv
            if heads is None:
                raise ValueError(f"{CALLER}: a Llama adapter on {module!r} needs the base's head "
                                 f"counts to reorder its rows as llama.cpp does; pass base_gguf= "
                                 f"(the base's GGUF file) or config= (its config.json folder)")
            B = rope_rows_interleaved(B, heads)
        out[f"{tensor}.lora_a"] = m.lora_A.float().contiguous()
        out[f"{tensor}.lora_b"] = B.contiguous()
    if problems:
        raise ValueError(f"{CALLER}: llama.cpp cannot load {adapter.path} onto a {base.arch!r} base "
                         f"({base.source}):\n  - " + "\n  - ".join(problems))
    return out


# ---- the base: from its GGUF file, a config, or the adapter's own record -----------------------
# GGUF's value types with a fixed size, as struct formats (gguf.GGUFValueType's numbers).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_gguf_header(path: str | os.PathLike) -> tuple[dict[str, object], dict[str, tuple[int, ...]]]:
    """The scalar and string metadata of a GGUF file, and its tensors' shapes, from its header.

    ``gguf.GGUFReader`` makes a numpy view of every element of every array, and a base model's
    vocabulary (49k to 151k token strings, as many merges) costs it seconds; what the export
    checks (architecture, head counts, shapes) is a few scalars. Arrays are stepped over, and
    are not in the returned fields. Shapes are in GGUF's order (innermost dimension first).
    Raises ValueError on a file that is not GGUF or ends inside its header.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} does not start with GGUF's magic")
        # A big-endian file's version, read little-endian, has its low 16 bits zero (as gguf's reader checks).
        e = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"
        n_tensors, n_fields = struct.unpack_from(e + "QQ", buf, 8)
        pos = 24

        def take(fmt: str):  # noqa: ANN202 - one value of struct format fmt
            nonlocal pos
            value = struct.unpack_from(e + fmt, buf, pos)[0]
            pos += struct.calcsize(e + fmt)
            return value

        def string() -> str:
            nonlocal pos
            n = take("Q")
            if pos + n > len(buf):
                raise ValueError(f"{path} ends inside its header")
            pos += n
            return bytes(buf[pos - n:pos]).decode("utf-8")

        def value(kind: int):  # noqa: ANN202 - a scalar, a string, or None for an array (skipped)
            nonlocal pos
            if kind in _SCALARS:
                return take(_SCALARS[kind])
            if kind == _STRING:
                return string()
            if kind != _ARRAY:
                raise ValueError(f"{path}: unknown GGUF value type {kind}")
            item, count = take("I"), take("Q")
            if item in _SCALARS:  # fixed-size elements: one step over all of them
                pos += count * struct.calcsize(e + _SCALARS[item])
            else:
                for _ in range(count):
                    value(item)
            return None

        fields: dict[str, object] = {}
        for _ in range(n_fields):
            key = string()
            v = value(take("I"))
            if v is not None:
                fields[key] = v
        shapes: dict[str, tuple[int, ...]] = {}
        for _ in range(n_tensors):
            name = string()
            shapes[name] = tuple(take("Q") for _ in range(take("I")))
            pos += 4 + 8  # the tensor's type and data offset
        if pos > len(buf):
            raise ValueError(f"{path} ends inside its header")
    return fields, shapes


def _from_gguf(path: Path) -> BaseInfo:
    if not path.is_file():
        raise FileNotFoundError(f"{CALLER}: base GGUF {path} not found")
    try:
        fields, shapes = read_gguf_header(path)
    except (ValueError, struct.error, UnicodeDecodeError, OSError) as exc:  # not GGUF, cut short, empty
        raise ValueError(f"{CALLER}: {path} is not a readable GGUF file ({exc})") from None
    arch = fields.get("general.architecture")
    if fields.get("general.type") not in (None, "model") or arch is None:
        raise ValueError(f"{CALLER}: {path} is not a base model GGUF (general.type = "
                         f"{fields.get('general.type')!r}, architecture {arch!r})")
    return BaseInfo(arch, fields.get(f"{arch}.attention.head_count"),
                    fields.get(f"{arch}.attention.head_count_kv"), shapes, f"base GGUF {path}")


def _from_config(config: object) -> BaseInfo:
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{CALLER}: cannot read the base's config {path}: {exc}") from None
        source = str(path)
    else:
        values, source = config.to_dict(), f"{type(config).__name__}"  # a transformers config
    # a config made in memory names no class; its model_type ("llama", "qwen2") then does
    cls = (values.get("architectures") or [None])[0] or MODEL_TYPES.get(values.get("model_type"))
    return BaseInfo(_arch_of(cls, source), values.get("num_attention_heads"),
                    values.get("num_key_value_heads") or values.get("num_attention_heads"),
                    None, source)


def _arch_of(model_class: str | None, source: str) -> str:
    if model_class not in ARCHITECTURES:
        raise ValueError(f"{CALLER}: {source} names the base {model_class!r}; loracore writes "
                         f"GGUF adapters for {sorted(ARCHITECTURES)} (llama.cpp names "
                         f"{sorted(ARCHITECTURES.values())})")
    return ARCHITECTURES[model_class]


def _base_info(adapter: AdapterFile, base_gguf: Path | None, config: object) -> BaseInfo:
    """The base as the export sees it; the sources given must agree on the architecture."""
    infos = ([_from_gguf(base_gguf)] if base_gguf is not None else []) + \
            ([_from_config(config)] if config is not None else [])
    recorded = (adapter.base_fingerprint or {}).get("architecture")
    if recorded is not None:
        infos.append(BaseInfo(_arch_of(recorded, f"the record in {adapter.path}")))
    if not infos:
        raise ValueError(f"{CALLER}: {adapter.path} does not say which model it belongs to (a file "
                         f"written by PEFT); pass base_gguf= (the base's GGUF file) or config=")
    unknown = [i for i in infos if i.arch not in ARCHITECTURES.values()]
    if unknown:
        raise ValueError(f"{CALLER}: {unknown[0].source} is a {unknown[0].arch!r} model; loracore "
                         f"writes GGUF adapters for llama.cpp's {sorted(ARCHITECTURES.values())}")
    if len({i.arch for i in infos}) > 1:
        raise ValueError(f"{CALLER}: the base's architecture disagrees: " + ", ".join(
            f"{i.arch!r} in {i.source}" for i in infos) + "; llama.cpp refuses an adapter of "
            "another architecture than its base")
    heads = next((i for i in infos if i.n_head is not None), infos[0])
    return BaseInfo(infos[0].arch, heads.n_head, heads.n_head_kv, infos[0].shapes, infos[0].source)


def _write_gguf(tmp: Path, arch: str, alpha: float, tensors: dict[str, torch.Tensor],
                dtype: str, name: str) -> None:
    _, _, file_type = DTYPES[dtype]
    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    writer.add_file_type(file_type)
    for key, t in tensors.items():
        add_tensor(writer, key, t, dtype)
    write_and_close(writer, tmp)


def add_tensor(writer: gguf.GGUFWriter, key: str, t: torch.Tensor, dtype: str) -> None:
    """Add ``t`` (float32, on the CPU) to ``writer`` as ``key`` in ``dtype`` (a :data:`DTYPES` key)."""
    np_dtype, ggml_type, _ = DTYPES[dtype]
    data = t.numpy().astype(np_dtype)
    if dtype == "bf16":  # numpy has no bfloat16: gguf packs it into bytes
        writer.add_tensor(key, gguf.quants.quantize(data, ggml_type), raw_dtype=ggml_type)
    else:
        writer.add_tensor(key, data)


def write_and_close(writer: gguf.GGUFWriter, path: Path) -> None:
    """Write the header, the metadata and the tensors ``writer`` holds to ``path``; close it."""
    try:
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def modelfile_text(base_gguf: str | None, adapter_file: str, base_name: str | None = None) -> str:
    """An Ollama Modelfile: ``FROM`` the base's GGUF file and ``ADAPTER`` the adapter's; without
    a base file, ``FROM`` is a placeholder to replace (a comment names the base)."""
    head = "# ollama create NAME -f THIS_FILE (the base must be the model the adapter was trained on)\n"
    if base_gguf is None:
        head += (f"# replace BASE_MODEL.gguf by the GGUF file of {base_name or 'the base model'} "
                 f"(or its Ollama model name)\n")
    return f"{head}FROM {base_gguf or 'BASE_MODEL.gguf'}\nADAPTER {adapter_file}\n"


def export_gguf_adapter(adapter_folder: str | os.PathLike, out_file: str | os.PathLike, *,
                        base_gguf: str | os.PathLike | None = None, config: object = None,
                        dtype: str = "f32", modelfile: bool = True) -> Path:
    """Write the adapter in ``adapter_folder`` (PEFT's format) as llama.cpp's GGUF LoRA file
    ``out_file``, and with ``modelfile`` an Ollama ``<stem>.Modelfile`` beside it.

    The base is described by ``base_gguf`` (the GGUF llama.cpp will load: its architecture,
    head counts and tensor shapes, all checked), by ``config`` (a transformers config, or a
    model folder / ``config.json``), or else by loracore's record in the adapter. ``dtype``:
    ``"f32"`` (exact), ``"f16"`` or ``"bf16"``. Everything is checked before the disk is
    touched; each file is replaced whole or not at all (a failure leaves the old one).
    Returns the GGUF file's path.
    """
    if dtype not in DTYPES:
        raise ValueError(f"{CALLER}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out_file)
    if out.is_dir():
        raise ValueError(f"{CALLER}: {out} is a folder; give the GGUF file's path")
    adapter = read_adapter(adapter_folder, caller=CALLER)
    if adapter.use_dora:
        raise ValueError(f"{CALLER}: {adapter.path} is a DoRA adapter; llama.cpp's GGUF LoRA has no "
                         f"magnitude vector. Merge it into the base (loracore export merged) and "
                         f"convert the merged model instead")
    base = _base_info(adapter, Path(base_gguf) if base_gguf is not None else None, config)
    alpha = gguf_alpha(adapter)
    tensors = gguf_lora_tensors(adapter, base)
    if dtype == "f16":
        big = [k for k, t in tensors.items() if t.abs().max() > np.finfo(np.float16).max]
        if big:
            raise ValueError(f"{CALLER}: {big[:3]} hold values beyond float16's range; use dtype='f32'")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise disk_write_error(exc, out, "nothing was written") from None
    atomic_write_file(out, lambda tmp: _write_gguf(tmp, base.arch, alpha, tensors, dtype,
                                                   adapter.path.name))
    if modelfile:
        text = modelfile_text(str(Path(base_gguf).resolve()) if base_gguf is not None else None,
                              out.name, adapter.config.get("base_model_name_or_path"))
        atomic_write_text(out.with_name(f"{out.stem}.Modelfile"), text)
    return out
