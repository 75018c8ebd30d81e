"""The converted-model cache: a GGUF model converted once to a plain safetensors folder, and
trusted only while its manifest checks out.

transformers dequantizes a GGUF file on every load (15-20 s for SmolLM2-135M), while a
safetensors folder loads in a few seconds. :func:`build_gguf_cache` converts once, under a lock
(two notebooks may start together), and writes the folder with
:func:`loracore.atomic.write_folder`: a crash leaves the old folder or the new one, never half
of one. The folder's manifest records the size and SHA-256 of every file, and
:func:`cache_problem` checks them before a load trusts the folder; a failing cache is rebuilt.

Which models are cached, and where their GGUF comes from, is :mod:`loracore.models`' business
(:func:`loracore.models.build_smollm2_cache`).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from loracore.atomic import sha256_file, write_folder

if TYPE_CHECKING:
    import torch

# torch and transformers are imported where a build needs them: checking a complete cache
# (cache_problem, write_manifest) then takes a fraction of a second, not the seconds those
# imports take (tools/qwen2_standin.py reuses its folder that way).

__all__ = ["CACHE_FORMAT", "MANIFEST", "cache_root", "cache_problem", "cache_lock",
           "write_manifest", "build_gguf_cache"]

#: Bump when the cache layout changes, so old caches are rebuilt rather than misread.
CACHE_FORMAT = 1
#: The manifest's file name inside a cache folder.
MANIFEST = "loracore-manifest.json"


def cache_root() -> Path:
    """Where loracore keeps converted models: ``$LORACORE_CACHE``, else ``~/.cache/loracore``."""
    env = os.environ.get("LORACORE_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loracore"


def cache_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete cache, or ``None`` when it is one.

    A cache is complete when its manifest exists, has the current format, and every file
    it lists has the recorded size and SHA-256: a truncated or edited file is caught here,
    before transformers reads half of it.
    """
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (never built, or interrupted)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files: dict[str, dict[str, object]] = manifest["files"]
        fmt = manifest["format"]
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest"
    if fmt != CACHE_FORMAT:
        return f"cache format {fmt}, expected {CACHE_FORMAT}"
    for fname, info in files.items():
        fpath = folder / fname
        if not fpath.is_file():
            return f"{fname} is missing"
        if fpath.stat().st_size != info["size"]:
            return f"{fname} has {fpath.stat().st_size} bytes, expected {info['size']}"
        if sha256_file(fpath) != info["sha256"]:
            return f"{fname} does not match its checksum"
    return None


@contextmanager
def cache_lock(root: Path, name: str) -> Iterator[None]:
    """Hold ``root / f".{name}.lock"`` exclusively: one builder of a cache at a time, and a
    second process that wanted to build finds the first one's complete folder instead."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_cache(folder: Path, model: torch.nn.Module, tokenizer, source: Path,
                 description: str) -> None:
    """Write a loadable Hugging Face folder and its manifest (the last file written)."""
    from safetensors.torch import save_model  # looked up per call: the crash tests replace it

    # transformers refuses save_pretrained on a GGUF-loaded model; safetensors' save_model
    # writes the weights (tied embeddings once) and we write the config ourselves, without
    # the GGUF quantization_config: a later 4-bit load would otherwise be refused as
    # "already quantized with GgufConfig".
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = description
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_manifest(folder, source)


def write_manifest(folder: Path, source: Path | str, **extra: object) -> None:
    """Record the size and SHA-256 of every file in ``folder`` in its manifest, written last,
    so that :func:`cache_problem` accepts the folder from now on; ``extra`` keys are stored too."""
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"format": CACHE_FORMAT, "source": str(source), **extra, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def build_gguf_cache(target: Path, gguf_path: Callable[[], Path], *, name: str,
                     description: str, force: bool = False, verbose: bool = True) -> Path:
    """Convert a GGUF model to the safetensors folder ``target`` once; return ``target``.

    Args:
        target: the cache folder (a normal Hugging Face model folder once built).
        gguf_path: returns the GGUF file; called only when a build is needed, so a complete
            cache loads even where the GGUF's package is gone.
        name: short name for messages and the lock file ``target.parent / f".{name.lower()}.lock"``.
        description: recorded as the config's ``_name_or_path``.
        force: rebuild even a complete cache.
        verbose: print what is being built and how long it took.

    An existing cache that fails :func:`cache_problem` is rebuilt; the new folder replaces the
    old one whole (none of the old files stay), and only once it is complete.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with cache_lock(target.parent, name.lower()):
        problem = "rebuild requested" if force else cache_problem(target)
        if problem is None:
            return target
        gguf = gguf_path()
        if verbose and target.exists():
            print(f"loracore: rebuilding the {name} cache at {target} ({problem})")
        elif verbose:
            print(f"loracore: converting {gguf.name} to a safetensors cache at {target} (once)")
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        write_folder(target, lambda folder: _write_cache(folder, model, tokenizer, gguf, description),
                     keep_others=False)
        if verbose:
            print(f"loracore: cache ready in {time.perf_counter() - start:.1f} s")
        return target
