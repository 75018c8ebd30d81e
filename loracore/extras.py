"""The optional parts of loracore and the pip extras that install them.

``pip install loracore`` gives the library: layers, adapter files, training, quantization,
merging, the serving engine in Python. Two commands need more, each its own extra:

- ``serve``: the HTTP server (``python -m loracore.serve``, :mod:`loracore.serve.server`);
- ``grade``: ``loracore grade``, which runs learners' lab notebooks in kernels and charts the
  class. It runs the labs, so it installs what the labs import beyond the library too
  (matplotlib, and for lab 05 the server, ``openai`` and ``requests``).

``course`` (``pip install -e ".[course]"``, what ``make`` installs) holds every extra plus the
notebooks' stack (JupyterLab, PEFT and bitsandbytes to compare against, the test tools).
tests/test_extras.py keeps :data:`EXTRAS` in step with pyproject.toml.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "MissingExtra", "require_extra"]

#: Each extra's packages, as pyproject.toml names them (each is also its import name).
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn"),
    "grade": ("nbformat", "nbclient", "ipykernel", "matplotlib", "openai", "requests",
              "fastapi", "uvicorn"),
}


class MissingExtra(ModuleNotFoundError):
    """A command needs a package that only an extra installs; the message says which extra."""


def require_extra(extra: str, what: str) -> None:
    """Raise :class:`MissingExtra` naming ``extra`` when any of its packages is missing.

    Args:
        extra: a key of :data:`EXTRAS` (``"serve"`` or ``"grade"``).
        what: the command or module that needs it, for the message (``"loracore grade"``).
    """
    if extra not in EXTRAS:
        raise ValueError(f"loracore.extras: unknown extra {extra!r}; the extras are {sorted(EXTRAS)}")
    missing = [name for name in EXTRAS[extra] if not _installed(name)]
    if missing:
        raise MissingExtra(
            f"{what} needs {', '.join(missing)}, which `pip install loracore` leaves out: "
            f"install the {extra!r} extra with  pip install 'loracore[{extra}]'  "
            f"(in a checkout of the course: pip install -e '.[{extra}]', or '.[course]' for everything)",
            name=missing[0])


def _installed(name: str) -> bool:
    # find_spec looks without importing (the grade extra's packages take seconds to import);
    # a module set to None in sys.modules (blocked) counts as missing, as `import` would say.
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken parent package, or a module without a spec
        return False
