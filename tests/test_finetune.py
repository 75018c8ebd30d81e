"""`loracore finetune`: one process equals two (torchrun, gloo), a killed run resumes to the same
adapter bit for bit, and bad input is refused with a message that says what to fix.

Runs on tiny-qwen2 (milliseconds a step); the processes are real: torchrun and SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loracore import finetune
from loracore.checkpoint import read_checkpoint

from conftest import run_script

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "capitals_train.jsonl"
EVAL = ROOT / "data" / "capitals_test.jsonl"
COMMON = ["--model", "tiny-qwen2", "--data", str(DATA), "--rank", "4", "--lora-alpha", "8",
          "--batch-size", "4", "--lr", "5e-3", "--no-progress"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, args: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "loracore.finetune",
           *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _run(out: Path, *extra: str) -> int:
    return finetune.main([*COMMON, "--out", str(out), *extra])


# ---- results ------------------------------------------------------------------------------
def test_two_processes_equal_one(tmp_path):
    """torchrun with 2 gloo processes, each taking half of every global batch, gives the
    single-process adapter within 1e-6 after 5 steps (grad accumulation included). The single
    process is this one (as under ``torchrun --nproc_per_node=1``: WORLD_SIZE 1, no process group)."""
    args = [*COMMON, "--steps", "5", "--grad-accum", "2"]
    assert finetune.main([*args, "--out", str(tmp_path / "one")]) == 0
    two = _torchrun(2, [*args, "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 28  # 7 projections x 2 layers x (A, B)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    # B starts at zero: a non-zero B proves the steps trained something
    assert all(a[k].abs().max() > 0 for k in a if k.endswith("lora_B.weight"))
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())
    assert h1["loss"] == pytest.approx(h2["loss"], abs=1e-6)
    assert two.stdout.count("Adapter saved") == 1  # rank 0 alone prints and writes


def test_outputs_load_back_and_record_the_run(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "--steps", "3", "--eval", str(EVAL), "--eval-every", "2") == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                     "adapter_model.safetensors", "history.json",
                                                     "training_args.json"]
    args = json.loads((out / "training_args.json").read_text())
    assert args["r"] == 4 and args["steps"] == 3 and args["target_modules"] == "all-linear"
    history = json.loads((out / "history.json").read_text())
    assert len(history["loss"]) == 3 and len(history["lr"]) == 3
    assert [e["step"] for e in history["eval"]] == [2, 3] and history["tokens"] > 0

    from loracore.adapters import load_adapter
    from loracore.models import load_base_model
    model, _ = load_base_model("tiny-qwen2", verbose=False)
    load_adapter(model, out)
    saved = _adapter(out)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert torch.equal(layer.lora_A["default"].weight,
                       saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])


def test_use_dora_trains_and_saves_a_dora_adapter(tmp_path):
    out = tmp_path / "dora"
    assert _run(out, "--steps", "2", "--use-dora") == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    assert json.loads((out / "training_args.json").read_text())["use_dora"] is True
    saved = _adapter(out)
    assert sum("lora_magnitude_vector" in k for k in saved) == sum(".lora_A." in k for k in saved) > 0

    from loracore.adapters import load_adapter
    from loracore.models import load_base_model
    model, _ = load_base_model("tiny-qwen2", verbose=False)
    load_adapter(model, out)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert "default" in layer.lora_magnitude_vector


def test_model_from_a_local_folder_and_qlora(tmp_path):
    from loracore.models import load_base_model
    model, tokenizer = load_base_model("tiny-qwen2", verbose=False)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    args = [a if a != "tiny-qwen2" else str(tmp_path / "base") for a in COMMON]
    assert finetune.main([*args, "--out", str(tmp_path / "a"), "--steps", "2"]) == 0
    assert _run(tmp_path / "b", "--steps", "2") == 0
    # the same weights by path or by name: the same adapter
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _run(tmp_path / "q", "--steps", "2", "--qlora") == 0
    q = _adapter(tmp_path / "q")
    assert any(not torch.equal(q[k], b[k]) for k in q)  # a 4-bit base trains differently


# ---- resume -------------------------------------------------------------------------------
KILLER = textwrap.dedent("""
    import os, signal, sys
    import loracore.atomic as atomic
    import loracore.finetune as ft
    where, at = sys.argv[1], int(sys.argv[2])
    if where == "after-checkpoint":  # the checkpoint of step `at` is written, then the kill
        original = ft._save_checkpoint
        def save(*args, **kwargs):
            original(*args, **kwargs)
            if args[5]["step"] == at:
                os.kill(os.getpid(), signal.SIGKILL)
        ft._save_checkpoint = save
    else:  # killed inside a checkpoint write, the `at`-th time it reaches stage `where`
        seen = []
        def stage(name):
            seen.append(name)
            if seen.count(where) == at:
                os.kill(os.getpid(), signal.SIGKILL)
        atomic._stage = stage
    sys.exit(ft.main(sys.argv[3:]))
""")


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """The 6-step run with a checkpoint every 2, never interrupted (made once; only read)."""
    out = tmp_path_factory.mktemp("whole") / "whole"
    assert _run(out, *SIGKILL_STEPS) == 0
    return out


SIGKILL_STEPS = ["--steps", "6", "--save-every", "2"]


@pytest.mark.parametrize("where, at, resumes_from", [
    ("after-checkpoint", 4, 4),
    ("new-complete", 2, 2),  # step 4's checkpoint complete but not in place: step 2's is kept
    ("old-aside", 1, 4),     # step 2's moved aside, step 4's complete: step 4's is taken
])
def test_sigkill_then_resume_gives_the_same_adapter_bit_for_bit(whole, tmp_path, where, at, resumes_from):
    steps = SIGKILL_STEPS
    out = tmp_path / "killed"
    child = run_script(KILLER, [where, str(at), *COMMON, "--out", str(out), *steps], timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert not (out / "adapter_model.safetensors").exists()  # it really died before the end
    assert read_checkpoint(out / "checkpoint")["state"]["step"] == resumes_from

    assert _run(out, *steps, "--resume") == 0
    h_whole = json.loads((whole / "history.json").read_text())
    whole, resumed = _adapter(whole), _adapter(out)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    h_resumed = json.loads((out / "history.json").read_text())
    assert h_whole["loss"] == h_resumed["loss"]
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") or "checkpoint" in p.name]
    assert leftovers == []


# ---- bad input ----------------------------------------------------------------------------
def test_broken_data_line_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "train.jsonl"
    lines = DATA.read_text().splitlines()
    bad.write_text("\n".join(lines[:3] + ['{"messages": [oops'] + lines[3:6]) + "\n")
    args = [a if a != str(DATA) else str(bad) for a in COMMON]
    assert finetune.main([*args, "--out", str(tmp_path / "o"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:4" in err and "not valid JSON" in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_resume_from_a_different_configuration_says_which_setting(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--steps", "4", "--save-every", "2") == 0
    # a finished run has no checkpoint left; make one that stops half-way
    out2 = tmp_path / "half"
    child = run_script(KILLER, ["after-checkpoint", "2", *COMMON, "--out", str(out2), "--steps",
                                "4", "--save-every", "2"], timeout=120)
    assert child.returncode == -signal.SIGKILL
    before = {p.name: p.stat().st_mtime_ns for p in out2.rglob("*")}
    assert finetune.main([*COMMON[:4], "--rank", "8", *COMMON[6:], "--out", str(out2),
                          "--steps", "4", "--save-every", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "r: the checkpoint's run has 4, this command 8" in err
    assert finetune.main([*COMMON, "--lr", "1e-2", "--out", str(out2), "--steps", "4",
                          "--save-every", "2", "--resume"]) == 2
    assert "lr:" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out2.rglob("*")} == before  # untouched
    assert _run(out, "--steps", "4", "--resume") == 2  # finished: no checkpoint to resume
    assert "no checkpoint folder" in capsys.readouterr().err


def test_output_folder_with_other_files_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my thesis")
    assert _run(out, "--steps", "1") == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert _run(out, "--steps", "1", "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "my thesis"  # replaced our files, not theirs
    assert _run(out, "--steps", "1") == 2
    assert "an earlier run" in capsys.readouterr().err


def test_world_size_must_divide_the_global_batch(tmp_path, monkeypatch, capsys):
    """Each of 2 processes refuses before writing anything, and rank 0 alone says why. Each
    process is played here in turn: torchrun's environment, and a process group of 2 members
    (torch's in-process "fake" backend), which ``run_command`` closes on the way out. (The real
    two-process run is test_two_processes_equal_one's.)"""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

    args = [a if a != "4" else "3" for a in COMMON]  # --rank 3, --batch-size 3
    for rank in (0, 1):
        for name, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", 2)):
            monkeypatch.setenv(name, str(value))
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=2)
        assert finetune.main([*args, "--out", str(tmp_path / "o"), "--steps", "1"]) == 2
        assert not dist.is_initialized()
        err = capsys.readouterr().err
        if rank == 0:
            assert "--batch-size 3 is not divisible by the 2 processes" in err
        else:
            assert err == ""
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "expected a number >= 1"),
    (["--steps", "2.5"], "expected a whole number"),
    (["--steps", "1", "--lr", "-1"], "expected a finite number > 0"),
    (["--steps", "1", "--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
    (["--steps", "2", "--warmup-steps", "3"], "--warmup-steps must be between 0 and --steps"),
    (["--steps", "1", "--resume", "--overwrite"], "pass one of them"),
    (["--steps", "1", "--eval", "/no/such/file.jsonl"], "--eval: no such file"),
])
def test_bad_arguments_are_refused(tmp_path, capsys, extra, message):
    try:
        code = _run(tmp_path / "o", *extra)
    except SystemExit as exc:  # argparse's own refusal (exit 2)
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_model_is_refused(tmp_path, capsys):
    args = [a if a != "tiny-qwen2" else "no-such-model" for a in COMMON]
    assert finetune.main([*args, "--out", str(tmp_path / "o"), "--steps", "1"]) == 2
    assert "neither a course model" in capsys.readouterr().err


def test_the_loracore_command_runs_it(tmp_path, capsys):
    """`loracore finetune` (here as `python -m loracore`, a fresh process) is the same command;
    its refusal is exit status 2 (the second run, through the same entry point in this process:
    ``python -m loracore`` exits with what ``cli.main`` returns)."""
    from loracore import cli

    done = subprocess.run([sys.executable, "-m", "loracore", "finetune", *COMMON, "--out",
                           str(tmp_path / "o"), "--steps", "1"], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()
    assert cli.main(["finetune", *COMMON, "--out", str(tmp_path / "o"), "--steps", "1"]) == 2
    assert "already holds an earlier run" in capsys.readouterr().err


@pytest.mark.parametrize("machine, device, choice, want", [
    (dict(cuda=False), "cpu", "auto", "float32"),
    (dict(cuda=True, bf16=True), "cuda:0", "auto", "bfloat16"),   # as the server and pick_device()
    (dict(cuda=True, bf16=False), "cuda:0", "auto", "float32"),   # they say float16: no GradScaler here
    (dict(cuda=True, bf16=True, gpus=2), "cuda:1", "auto", "bfloat16"),  # torchrun's second process
    (dict(cuda=False), "cpu", "bfloat16", "bfloat16"),
    (dict(cuda=True, bf16=True), "cuda:0", "float32", "float32"),
])
def test_dtype_auto_is_the_serving_decision_except_float16(monkeypatch, machine, device, choice, want):
    from test_models import fake_machine

    fake_machine(monkeypatch, **machine)
    assert finetune._dtype_name(choice, torch.device(device)) == want
