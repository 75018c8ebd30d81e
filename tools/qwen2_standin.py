#!/usr/bin/env python3
"""A Qwen2-architecture stand-in for Qwen2-0.5B-Instruct, built offline, for CI.

    python tools/qwen2_standin.py HF_HOME [--tied] [--force]

CI has no network, yet every notebook must also run through the ``qwen2-0.5b`` path of
:func:`loracore.models.load_base_model`. This tool puts a Qwen2 model exactly where a networked
learner's copy of ``Qwen/Qwen2-0.5B-Instruct`` would be, in the Hugging Face cache under
``HF_HOME``::

    HF_HOME/hub/models--Qwen--Qwen2-0.5B-Instruct/
        refs/main                      the snapshot's revision (40 hex digits)
        snapshots/<rev>/               config.json, model.safetensors, generation_config.json,
                                       tokenizer files, loracore-manifest.json

The model is SmolLM2-135M's weights (the offline model, :func:`loracore.models.build_smollm2_cache`)
in ``Qwen2ForCausalLM``: the same sizes, zero q/k/v biases (Qwen2 has them, Llama does not),
so it computes SmolLM2's function through Qwen2's module structure. By default the output head
is a separate copy of the embedding (untied, as the SmolLM2 path is tied, so that CI exercises
both); ``--tied`` ties it. It is NOT Qwen2-0.5B: not its weights, tokenizer, size or quality.
Its config says so (``_name_or_path``, ``"loracore_standin": true``), and ``load_base_model``
says so when it loads it.

The snapshot is written all or nothing (:func:`loracore.atomic.write_folder`: a hidden sibling
renamed into place), then ``refs/main``: a crash at any moment leaves nothing that the
``qwen2-0.5b`` path finds, or a complete stand-in. A complete stand-in (its manifest's sizes
and SHA-256 check out, :func:`loracore.model_cache.cache_problem`) is reused. A cache that
holds anything else of that repository (a learner's real download, even a partial one) is
refused: the tool never writes over a real model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

try:
    import loracore  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # run from a checkout without the install: the repository root is one up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loracore.atomic import atomic_write_text, remove_folder, write_bytes, write_folder
from loracore.model_cache import MANIFEST, cache_lock, cache_problem, write_manifest

QWEN2_REPO = "Qwen/Qwen2-0.5B-Instruct"  # loracore.models.QWEN2_REPO (not imported: it pulls torch)
REPO_FOLDER = "models--" + QWEN2_REPO.replace("/", "--")
#: Bump when what the stand-in holds changes: the revision changes with it, so a new build
#: replaces an old one instead of being mistaken for it.
STANDIN_FORMAT = 1
DESCRIPTION = "a loracore stand-in: SmolLM2-135M's weights in Qwen2's architecture (not Qwen2-0.5B)"
#: SmolLM2's files that are rewritten, not copied: its config (Llama), weights and manifest.
_REWRITTEN = {"config.json", "model.safetensors", MANIFEST}


class StandinRefused(RuntimeError):
    """The Hugging Face cache holds a model that is not a loracore stand-in; nothing was written."""


def standin_revision(tied: bool = False) -> str:
    """The stand-in's revision: 40 hex digits, the same on every machine for one variant and
    format (a real Hub revision is a commit hash of the same shape)."""
    head = "tied" if tied else "untied"
    return hashlib.sha1(f"loracore qwen2 stand-in, format {STANDIN_FORMAT}, {head} head"
                        .encode()).hexdigest()


def repo_dir(hf_home: Path) -> Path:
    """Where huggingface_hub keeps Qwen2-0.5B-Instruct under ``hf_home`` (HF_HUB_CACHE unset)."""
    return Path(hf_home) / "hub" / REPO_FOLDER


def _hidden(entry: Path) -> bool:
    """A hidden entry: a leftover of an interrupted write of ours (``.<name>.loracore-…``,
    ``.main.….tmp``), finished or removed by the next build."""
    return entry.name.startswith(".")


def is_standin(snapshot: Path) -> bool:
    """True when ``snapshot`` was written by this tool (its manifest, or its config's marker)."""
    if (snapshot / MANIFEST).is_file():
        return True
    try:
        return json.loads((snapshot / "config.json").read_text()).get("loracore_standin") is True
    except (OSError, ValueError, AttributeError):
        return False


def foreign_content(hf_home: Path) -> str | None:
    """What in ``hf_home``'s copy of Qwen2-0.5B-Instruct is not a loracore stand-in (a real
    download, complete or not), in words; ``None`` when there is nothing of the kind."""
    repo = repo_dir(hf_home)
    if not repo.exists():
        return None
    snapshots = repo / "snapshots"
    for entry in sorted(snapshots.iterdir()) if snapshots.is_dir() else ():
        if not _hidden(entry) and not is_standin(entry):
            return f"snapshot {entry.name} has no loracore stand-in marker"
    refs = repo / "refs"
    for ref in sorted(p for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else ():
        if _hidden(ref):
            continue
        rev = ref.read_text().strip()
        ours = rev in {standin_revision(True), standin_revision(False)} or is_standin(snapshots / rev)
        if ref.relative_to(refs).as_posix() != "main" or not ours:
            return f"refs/{ref.relative_to(refs).as_posix()} points at {rev!r}, not a stand-in"
    blobs = repo / "blobs"
    if blobs.is_dir() and any(blobs.iterdir()):
        return "blobs/ holds downloaded files (the stand-in stores none there)"
    for entry in repo.iterdir():
        if entry.name not in {"snapshots", "refs", "blobs"} and not _hidden(entry):
            return f"unexpected entry {entry.name}"
    return None


def _refuse_foreign(hf_home: Path) -> None:
    problem = foreign_content(hf_home)
    if problem is not None:
        raise StandinRefused(
            f"{repo_dir(hf_home)} holds a copy of {QWEN2_REPO} that is not a loracore stand-in "
            f"({problem}); the stand-in is never written over a real model. Give another "
            "HF_HOME (an empty folder), or remove that copy yourself if it is yours to remove.")


def _config(smollm2: dict, tied: bool) -> dict:
    """Qwen2's config with SmolLM2's sizes (``smollm2``: its config.json as a dict)."""
    from transformers import Qwen2Config

    rope = smollm2.get("rope_parameters") or {"rope_type": "default",
                                               "rope_theta": smollm2["rope_theta"]}
    config = Qwen2Config(
        vocab_size=smollm2["vocab_size"], hidden_size=smollm2["hidden_size"],
        intermediate_size=smollm2["intermediate_size"],
        num_hidden_layers=smollm2["num_hidden_layers"],
        num_attention_heads=smollm2["num_attention_heads"],
        num_key_value_heads=smollm2["num_key_value_heads"], hidden_act=smollm2["hidden_act"],
        max_position_embeddings=smollm2["max_position_embeddings"],
        rms_norm_eps=smollm2["rms_norm_eps"], rope_parameters=dict(rope),
        use_sliding_window=False, tie_word_embeddings=tied,
        bos_token_id=smollm2.get("bos_token_id"), eos_token_id=smollm2.get("eos_token_id"),
        pad_token_id=smollm2.get("pad_token_id"),
    ).to_dict()
    config.update(architectures=["Qwen2ForCausalLM"], dtype=smollm2.get("dtype", "float32"),
                  _name_or_path=DESCRIPTION, loracore_standin=True)
    return config


def _weights(smollm2_weights: Path, config: dict, tied: bool) -> bytes:
    """SmolLM2's tensors under Qwen2's names (the same names), plus zero q/k/v biases and,
    untied, ``lm_head.weight`` as a copy of the embedding; serialized as safetensors bytes
    (written with :func:`loracore.atomic.write_bytes`, which names the file when the disk is full)."""
    import torch
    from safetensors.torch import load_file, save

    tensors = load_file(str(smollm2_weights))
    # SmolLM2's head is its embedding, stored once under either name (safetensors keeps one)
    embed = tensors.pop("model.embed_tokens.weight", None)  # [vocab, hidden]
    embed = tensors.pop("lm_head.weight") if embed is None else embed
    tensors.pop("lm_head.weight", None)
    tensors["model.embed_tokens.weight"] = embed
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    outputs = {"q_proj": config["num_attention_heads"] * head_dim,
               "k_proj": config["num_key_value_heads"] * head_dim,
               "v_proj": config["num_key_value_heads"] * head_dim}
    for i in range(config["num_hidden_layers"]):
        for proj, out in outputs.items():
            weight = tensors[f"model.layers.{i}.self_attn.{proj}.weight"]  # [out, hidden]
            if weight.shape[0] != out:
                raise ValueError(f"SmolLM2's layer {i} {proj} has shape {tuple(weight.shape)}, "
                                 f"expected {out} outputs")
            tensors[f"model.layers.{i}.self_attn.{proj}.bias"] = torch.zeros(out, dtype=weight.dtype)
    if not tied:
        tensors["lm_head.weight"] = embed.clone()  # the same function, a parameter of its own
    return save(tensors, metadata={"format": "pt"})


def _write_snapshot(folder: Path, smollm2: Path, tied: bool) -> None:
    """Everything the snapshot holds, the manifest last (``folder``: write_folder's hidden one)."""
    config = _config(json.loads((smollm2 / "config.json").read_text()), tied)
    write_bytes(folder / "model.safetensors", _weights(smollm2 / "model.safetensors", config, tied))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for entry in sorted(smollm2.iterdir()):  # tokenizer files, chat template, generation config
        if entry.is_file() and entry.name not in _REWRITTEN:
            shutil.copyfile(entry, folder / entry.name)
    write_manifest(folder, smollm2, standin_format=STANDIN_FORMAT, tied=tied)


def _verify(hf_home: Path, snapshot: Path) -> None:
    """huggingface_hub, asked as the ``qwen2-0.5b`` path asks it, finds this snapshot's files."""
    from huggingface_hub import try_to_load_from_cache

    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        found = try_to_load_from_cache(QWEN2_REPO, name, cache_dir=Path(hf_home) / "hub")
        if found != str(snapshot / name):
            raise RuntimeError(f"huggingface_hub finds {found!r} for {QWEN2_REPO}/{name} under "
                               f"{hf_home}, expected {snapshot / name}")


def _shown(path: Path) -> str:
    """``path`` relative to the working folder when under it, else as given."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def build_standin(hf_home: Path, *, tied: bool = False, force: bool = False,
                  verbose: bool = False) -> Path:
    """Put the Qwen2 stand-in in ``hf_home``'s Hugging Face cache once; return its snapshot folder.

    Args:
        hf_home: the ``HF_HOME`` the notebooks will run with (``HF_HUB_CACHE`` unset); created
            if missing.
        tied: tie the output head to the embedding (default: an untied copy).
        force: rebuild even a complete stand-in.
        verbose: print one line: what was built or reused, where, and how long it took.

    Raises:
        StandinRefused: ``hf_home`` holds a copy of Qwen2-0.5B-Instruct that is not a stand-in
            (nothing is written then).
    """
    start = time.perf_counter()
    hf_home = Path(hf_home).expanduser()
    if hf_home.exists() and not hf_home.is_dir():
        raise NotADirectoryError(f"HF_HOME {hf_home} is a file, not a folder")
    _refuse_foreign(hf_home)  # before anything is written, even the lock file
    repo, rev = repo_dir(hf_home), standin_revision(tied)
    snapshot = repo / "snapshots" / rev
    with cache_lock(hf_home, "loracore-qwen2-standin"):
        _refuse_foreign(hf_home)  # again, now that no other build can be half-way
        problem = "rebuild requested" if force else cache_problem(snapshot)
        ref = repo / "refs" / "main"
        done = problem is None and ref.is_file() and ref.read_text().strip() == rev
        what = ("reused" if done else "completed" if problem is None  # crashed before refs/main
                else f"rebuilt ({problem})" if snapshot.exists() else "built")
        if not done:
            if problem is not None:
                from loracore.models import build_smollm2_cache

                smollm2 = build_smollm2_cache(verbose=False)
                write_folder(snapshot, lambda tmp: _write_snapshot(tmp, smollm2, tied),
                             keep_others=False)
            ref.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(ref, rev)  # only now does the qwen2-0.5b path see the snapshot
            for other in (repo / "snapshots").iterdir():  # the other variant, an older format
                if other.name != rev and not _hidden(other) and is_standin(other):
                    remove_folder(other)
            _verify(hf_home, snapshot)
    if verbose:
        head = "tied" if tied else "untied"
        print(f"qwen2_standin: {what} the {head}-head Qwen2 stand-in (SmolLM2-135M's weights) "
              f"for {QWEN2_REPO} at {_shown(snapshot)} in {time.perf_counter() - start:.1f} s")
    return snapshot


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (1 when the cache holds a real model)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_home", type=Path, help="the HF_HOME to put the stand-in in")
    parser.add_argument("--tied", action="store_true", help="tie the output head to the embedding")
    parser.add_argument("--force", action="store_true", help="rebuild even a complete stand-in")
    args = parser.parse_args(argv)
    try:
        build_standin(args.hf_home, tied=args.tied, force=args.force, verbose=True)
    except (StandinRefused, NotADirectoryError) as exc:
        print(f"qwen2_standin: refused: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
