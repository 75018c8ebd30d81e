"""The ``loracore export`` command: an adapter folder turned into what another program runs.

One subcommand per target; each is an ``add_TARGET(subparsers)`` listed in :data:`TARGETS`::

    loracore export merged runs/lab02 --out merged/lab02 [--base smollm2-135m] [--overwrite]
    loracore export gguf runs/lab02 --out lab02.gguf --base-gguf base.gguf [--write-base smollm2-135m]

``merged``: the base model with the adapter merged in, a plain transformers folder
(:func:`loracore.merged.merge_and_save`) that ``AutoModelForCausalLM.from_pretrained`` loads.
The base is the one the adapter's config names (``base_model_name_or_path``) unless ``--base``
says otherwise: one of the course's model names or a local model folder. The adapter is loaded
strictly: an adapter whose recorded base differs from the base given is refused.

``gguf``: the adapter as llama.cpp's GGUF LoRA file (:func:`loracore.gguf_export.export_gguf_adapter`)
with an Ollama ``Modelfile`` beside it; ``--write-base`` first writes the base model as a GGUF
model file (:func:`loracore.gguf_base.export_gguf_base`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

__all__ = ["add_arguments", "TARGETS", "base_for_adapter"]


def base_for_adapter(config: dict) -> str | None:
    """The base model an adapter config names, as ``--base`` spells it (a course model name or
    a local folder), or ``None`` when it names none this machine can load."""
    from loracore.models import KNOWN_MODELS, QWEN2_REPO, SMOLLM2_DESCRIPTION, smollm2_cache_dir

    named = config.get("base_model_name_or_path") or ""
    if not isinstance(named, str) or not named:
        return None
    if named.lower() in KNOWN_MODELS:
        return named.lower()
    if named == QWEN2_REPO:
        return "qwen2-0.5b"
    if named == SMOLLM2_DESCRIPTION or Path(named) == smollm2_cache_dir():
        return "smollm2-135m"
    return named if Path(named).is_dir() else None


def _load_base(base: str, dtype):  # type: ignore[no-untyped-def]
    """(model, tokenizer) for ``--base``: a course model name, else a local model folder
    (tokenizer ``None`` when the folder has none)."""
    from loracore.models import KNOWN_MODELS, load_base_model

    if base.lower() in KNOWN_MODELS:
        return load_base_model(base, dtype=dtype)
    if not Path(base).is_dir():
        raise ValueError(f"--base {base}: neither a course model ({', '.join(KNOWN_MODELS)}) nor "
                         f"a local model folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()
    has_tokenizer = any((Path(base) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    return model, AutoTokenizer.from_pretrained(base) if has_tokenizer else None


def run_merged(args: argparse.Namespace) -> int:
    """``loracore export merged``: refusals before any model is loaded, then load the base,
    load the adapter onto it, merge and save. Exit status 0, 2 (refused) or 1 (disk)."""
    from loracore.adapter_file import read_adapter
    from loracore.atomic import DiskWriteError, cause
    from loracore.models import DTYPES, BaseModelError

    def refuse(message: str) -> int:
        print(f"loracore export merged: error: {message}", file=sys.stderr)
        return 2

    try:
        adapter = read_adapter(args.adapter, caller="loracore export merged")
    except (ValueError, FileNotFoundError) as exc:
        return refuse(str(exc).removeprefix("loracore export merged: "))
    out = Path(os.path.realpath(args.out))
    if out == Path(os.path.realpath(adapter.path)):
        return refuse(f"--out {args.out} is the adapter's own folder; write the merged model elsewhere")
    if out.exists() and not out.is_dir():
        return refuse(f"--out {args.out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        return refuse(f"--out {args.out} exists and is not empty; pick a new folder or pass "
                      f"--overwrite to replace it whole")
    base = args.base or base_for_adapter(adapter.config)
    if base is None:
        named = adapter.config.get("base_model_name_or_path")
        return refuse(f"the adapter's config names no base model this machine can load "
                      f"(base_model_name_or_path: {named!r}); pass --base NAME or --base FOLDER")
    if os.path.isdir(base) and out == Path(os.path.realpath(base)):
        return refuse(f"--out {args.out} is the base model's folder; write the merged model elsewhere")
    try:
        from loracore.adapters import load_adapter
        from loracore.merged import describe, merge_and_save

        model, tokenizer = _load_base(base, DTYPES[args.dtype])
        load_adapter(model, adapter.path)
        folder = merge_and_save(model, out, tokenizer=tokenizer, overwrite=args.overwrite)
    except DiskWriteError as exc:
        print(f"loracore export merged: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, KeyError, FileExistsError, FileNotFoundError, BaseModelError) as exc:
        return refuse(str(exc))
    except OSError as exc:
        print(f"loracore export merged: error: {exc.filename}: {cause(exc)}", file=sys.stderr)
        return 1
    print(f"merged {adapter.path} into {base} ({args.dtype}): {describe(folder)}\n"
          f"load it with AutoModelForCausalLM.from_pretrained({str(folder)!r})")
    return 0


def add_merged(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merged", help="the base model with the adapter merged in, as a transformers folder",
        description="Load the base model, load the adapter onto it, merge it into the weights "
                    "and write a plain transformers model folder (config, generation config, "
                    "tokenizer, model.safetensors) that AutoModelForCausalLM.from_pretrained "
                    "loads. Written all or nothing.")
    p.add_argument("adapter", type=Path, metavar="ADAPTER_FOLDER",
                   help="the adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", type=Path, required=True, metavar="FOLDER",
                   help="the merged model's folder (refused if not empty, unless --overwrite)")
    p.add_argument("--base", default=None, metavar="NAME",
                   help="the base model: qwen2-0.5b, smollm2-135m, tiny-qwen2 or a local model "
                        "folder (default: the one the adapter's config names)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the dtype the base is loaded, merged (in float32, rounded once) and "
                        "saved in (default float32)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out folder whole")
    p.set_defaults(func=run_merged)


def add_gguf(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "gguf", help="the adapter as a GGUF LoRA file for llama.cpp and Ollama",
        description="Write an adapter folder (PEFT's format) as llama.cpp's GGUF LoRA file "
                    "(llama-cli -m BASE.gguf --lora FILE), and an Ollama Modelfile beside it "
                    "(FROM the base, ADAPTER the file). What llama.cpp cannot load (DoRA, a "
                    "module it does not adapt, another architecture) is refused.")
    p.add_argument("adapter", type=Path, metavar="ADAPTER", help="the adapter folder")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="the GGUF file to write")
    p.add_argument("--base-gguf", type=Path, metavar="FILE",
                   help="the base model's GGUF file: the adapter is checked against it "
                        "(architecture, tensor names and shapes) and the Modelfile names it")
    p.add_argument("--config", type=Path, metavar="DIR",
                   help="the base model's folder (config.json), when the adapter does not record "
                        "its base and no --base-gguf is given")
    p.add_argument("--write-base", metavar="MODEL",
                   help="first write the base model MODEL (a course model name such as "
                        "smollm2-135m or qwen2-0.5b, or a model folder) to --base-gguf")
    p.add_argument("--base-dtype", choices=["f32", "f16", "bf16"], default="f16",
                   help="the type of the base's weights with --write-base (default f16)")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32",
                   help="the adapter tensors' type (default f32, exact)")
    p.add_argument("--no-modelfile", dest="modelfile", action="store_false",
                   help="do not write OUT's .Modelfile for Ollama")
    p.set_defaults(func=run_export_gguf)


def run_export_gguf(args: argparse.Namespace) -> int:
    from loracore.atomic import DiskWriteError
    from loracore.gguf_export import export_gguf_adapter
    from loracore.models import BaseModelError

    try:
        if args.write_base:
            if args.base_gguf is None:
                raise ValueError("--write-base needs --base-gguf FILE, the file to write it to")
            _write_base(args.write_base, args.base_gguf, args.base_dtype)
        out = export_gguf_adapter(args.adapter, args.out, base_gguf=args.base_gguf,
                                  config=args.config, dtype=args.dtype, modelfile=args.modelfile)
    except (ValueError, FileNotFoundError, DiskWriteError, BaseModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    modelfile = out.with_name(f"{out.stem}.Modelfile")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)"
          + (f" and {modelfile}" if args.modelfile else "")
          + f"\nrun it: llama-cli -m {args.base_gguf or 'BASE.gguf'} --lora {out}")
    return 0


def _write_base(model: str, out: Path, dtype: str) -> None:
    """``loracore export gguf --write-base``: a course model or a model folder, as a GGUF file."""
    import torch

    from loracore.gguf_base import export_gguf_base

    base, tokenizer = _load_base(model, torch.float32)
    if tokenizer is None:
        raise ValueError(f"--write-base {model}: the folder has no tokenizer, which a GGUF model file needs")
    export_gguf_base(base, tokenizer, out, dtype=dtype)
    print(f"wrote the base {model} to {out} ({out.stat().st_size / 1e6:.1f} MB, {dtype})")


#: Each adds one export target.
TARGETS: list[Callable[[argparse._SubParsersAction], None]] = [add_merged, add_gguf]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``loracore export TARGET ...`` on ``parser``: one subparser per target."""
    targets = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    for add in TARGETS:
        add(targets)
