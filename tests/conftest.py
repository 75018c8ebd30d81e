"""Shared fixtures and helpers for the tests.

Fixtures: ``tiny`` (the tiny Qwen2 of loracore.models and its byte tokenizer), ``smollm2``
(the offline SmolLM2-135M, for the few slow tests), and a fixed seed before every test.

Helpers, imported by name (``from conftest import tiny_qwen2, randomize_B``; pytest puts
tests/ on the import path):

- :func:`tiny_qwen2` builds a seeded 2-layer Qwen2 without a tokenizer, in milliseconds;
- :func:`randomize_B` gives every ``lora_B`` non-zero values (B starts at zero, and a test of
  an adapter whose B is zero passes whatever the code does);
- :func:`snapshot` / :func:`assert_unchanged` check that a refused or interrupted operation
  left a model exactly as it was, and :func:`fail_on_call` injects the failure half-way;
- :func:`run_script` runs a Python script in a child process (a fork of this one on Linux), for
  the tests that kill it (SIGKILL) or cap its file size.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

from loracore.layer import LoRALinear
from loracore.models import load_base_model
from loracore.surgery import inject, lora_layers

Q0 = "model.layers.0.self_attn.q_proj"  # the first LoRA target of tiny_qwen2, named in messages


@pytest.fixture
def tiny():
    """A fresh tiny Qwen2 and its byte tokenizer (same seed, same weights, every time)."""
    return load_base_model("tiny-qwen2", verbose=False)


@pytest.fixture
def smollm2():
    """A fresh SmolLM2-135M-Instruct from the offline cache (about a second once cached)."""
    return load_base_model("smollm2-135m", verbose=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- the tiny model and non-zero B ----------------------------------------------------------
def tiny_qwen2(tied: bool = True) -> nn.Module:
    """A seeded 2-layer Qwen2 (hidden 64, 4 heads, 2 kv heads, vocabulary 128), in eval mode:
    milliseconds to build. ``tied`` ties the output head to the embeddings, as in the real
    tiny-qwen2."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return Qwen2ForCausalLM(cfg).eval()


def randomize_B(model_or_layer: nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """Give every lora_B of a model (or of one LoRALinear) values drawn from N(0, std²) with
    its own generator seeded ``seed``, so the global RNG is left alone."""
    g = torch.Generator().manual_seed(seed)
    layers = ([model_or_layer] if isinstance(model_or_layer, LoRALinear)
              else lora_layers(model_or_layer).values())
    with torch.no_grad():
        for layer in layers:
            for lin in layer.lora_B.values():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)


# ---- all or nothing: a refused or interrupted operation changes nothing -----------------------
def snapshot(model: nn.Module) -> dict:
    """Everything an operation could change, copied: which module object sits at each name,
    every tensor of the state dict, every ``requires_grad``, the training mode, each LoRA
    layer's adapters (names, active, merged, r, alpha, scaling, disabled, the weight kept for
    unmerging) and the ``requires_grad`` record that ``inject`` keeps."""
    return {
        "modules": {n: (type(m), id(m)) for n, m in model.named_modules()},
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": model.training,
        "lora": {n: (list(m.lora_A), list(m.active_adapters), list(m.merged_adapters), dict(m.r),
                     dict(m.lora_alpha), dict(m.scaling), m.disabled,
                     None if m._unmerged_weight is None else m._unmerged_weight.clone())
                 for n, m in lora_layers(model).items()},
        "record": copy.deepcopy(model.__dict__.get("_loracore_requires_grad", "absent")),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """``model`` is as :func:`snapshot` found it: same objects, same bits, same flags."""
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert after["record"] == before["record"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, t in before["tensors"].items():
        new = after["tensors"][k]
        # NaN != NaN, so a weight that held NaN before (a refused input) is compared with
        # equal_nan; exact all the same (no tolerance)
        assert new.dtype == t.dtype and (torch.equal(new, t) or (t.isnan().any() and torch.allclose(
            new, t, rtol=0, atol=0, equal_nan=True))), k
    assert after["lora"].keys() == before["lora"].keys()
    for n, old in before["lora"].items():
        new = after["lora"][n]
        assert new[:-1] == old[:-1], n
        assert (new[-1] is None) == (old[-1] is None) and (old[-1] is None or torch.equal(new[-1], old[-1]))


def fail_on_call(monkeypatch, owner, name: str, n: int, exc: BaseException | None = None) -> None:
    """Make ``owner.name`` raise on its ``n``-th call (the earlier calls run normally)."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc or RuntimeError(f"injected failure in {name} (call {n})")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def with_adapter(model: nn.Module, targets, r: int, alpha: float, *, seed: int = 1,
                 **kwargs) -> nn.Module:
    """A copy of ``model`` with adapter "default" on ``targets``, B non-zero (so it matters)."""
    m = inject(copy.deepcopy(model), targets, r, alpha, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lay in lora_layers(m).values():
            w = lay.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.2)
    return m


# ---- a child process that a test may kill -----------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, args: list[str], *, env: dict[str, str] | None = None,
               timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``script`` as ``python -c script *args`` would, in a child process; its exit status
    (``-N`` when signal N killed it), stdout and stderr come back as from :func:`subprocess.run`.

    On Linux the child is a fork of this process: a real process (SIGKILL, RLIMIT_FSIZE and the
    files it leaves are what they would be), without the 8-10 s of CPU a fresh interpreter spends
    importing torch, transformers and datasets. The script runs with ``__name__ == "__main__"``
    and ``sys.argv == ["-c", *args]``, changes only the child's copy of any module it patches,
    and the child never returns into pytest. ``env`` (for the variables the script reads at
    import, such as HF_HOME) needs a fresh interpreter: then it is one, and also off Linux and
    when PyTorch computes on more than one thread here: an OpenMP thread pool does not survive a
    fork (the child hangs at its first parallel region), and a child on fewer threads would not
    round as this process does. ``make test`` runs on one thread (OMP_NUM_THREADS=1).
    """
    torch_threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else 1
    if env is not None or not sys.platform.startswith("linux") or torch_threads != 1:
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                              text=True, timeout=timeout)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: run the script, then leave without unwinding pytest
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                sys.argv = ["-c", *args]
                exec(compile(script, "<run_script>", "exec"), {"__name__": "__main__"})
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + timeout
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(["<fork>", *args], timeout)
            time.sleep(0.01)
        status = done[1]
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(["<fork>", *args], code, out.read().decode(errors="replace"),
                                           err.read().decode(errors="replace"))
