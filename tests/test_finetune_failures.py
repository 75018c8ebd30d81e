"""`loracore finetune` when things go wrong: a full disk, a kill during the final save, damaged or
hostile checkpoint files, a careless --out. Each failure is one line on stderr that names the
file and the cause, and the output folder's files always describe one adapter.

Runs on tiny-qwen2. A full disk is simulated without root: in a child process, with the
file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored, so a write past it fails with EFBIG as a full
disk fails with ENOSPC), or in this process by making the write of one named file raise ENOSPC.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import signal
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loracore.adapters as adapters
from loracore import atomic, finetune
from loracore.checkpoint import read_checkpoint

from conftest import run_script

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "capitals_train.jsonl"
COMMON = ["--model", "tiny-qwen2", "--data", str(DATA), "--rank", "4", "--lora-alpha", "8",
          "--batch-size", "4", "--lr", "5e-3", "--no-progress"]
RUN_FILES = ["adapter_config.json", "adapter_model.safetensors", "history.json", "training_args.json"]


def _run(out: Path, *extra: str) -> int:
    return finetune.main([*COMMON, "--out", str(out), *extra])


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) and the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(err: str) -> str:
    """The error line of a refused run; fails unless it is exactly one line and no traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("loracore finetune: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


# A child process: finetune, with a fault at a chosen moment.
CHILD = textwrap.dedent("""
    import json, os, resource, signal, sys
    import loracore.adapters as adapters
    import loracore.atomic as atomic
    import loracore.finetune as ft
    fault, arg, snapshot = sys.argv[1], sys.argv[2], sys.argv[3]

    def limit_file_size(nbytes):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    if fault == "fsize-at-final-save":
        original = ft._finish
        def finish(*args, **kwargs):
            limit_file_size(int(arg))
            return original(*args, **kwargs)
        ft._finish = finish
    elif fault == "fsize-at-checkpoint":  # the checkpoint of step 4: the one of step 2 exists
        original = ft._save_checkpoint
        def save(*args, **kwargs):
            if args[5]["step"] == 4:
                folder = args[0]
                files = {p.name: p.read_bytes().hex() for p in sorted(folder.iterdir())}
                open(snapshot, "w").write(json.dumps(files))
                limit_file_size(int(arg))
            return original(*args, **kwargs)
        ft._save_checkpoint = save
    elif fault == "kill-after-checkpoint":
        original = ft._save_checkpoint
        def save(*args, **kwargs):
            original(*args, **kwargs)
            if args[5]["step"] == int(arg):
                os.kill(os.getpid(), signal.SIGKILL)
        ft._save_checkpoint = save
    elif fault == "kill-in-final-save":  # SIGKILL inside the last save, at `arg`
        die = lambda: os.kill(os.getpid(), signal.SIGKILL)
        original = ft._finish
        def finish(*args, **kwargs):
            if arg == "mid-weights":
                def half(tensors, filename, metadata=None):
                    open(filename, "wb").write(b"x" * 1000); die()
                adapters.save_file = half
            elif arg == "after-weights":
                real = adapters.save_file
                def then_die(tensors, filename, metadata=None):
                    real(tensors, filename, metadata=metadata); die()
                adapters.save_file = then_die
            else:
                atomic._stage = lambda s: die() if s == arg else None
            return original(*args, **kwargs)
        ft._finish = finish
    elif fault == "kill-at-random":  # SIGKILL `arg` seconds into the last save, wherever it is
        import threading, time
        original = ft._finish
        def finish(*args, **kwargs):
            def kill():
                time.sleep(float(arg)); os.kill(os.getpid(), signal.SIGKILL)
            threading.Thread(target=kill, daemon=True).start()
            original(*args, **kwargs)
            time.sleep(60)  # the kill comes during the save or here: never a clean exit
        ft._finish = finish
    sys.exit(ft.main(sys.argv[4:]))
""")


def _child(fault: str, arg: str, out: Path, *extra: str, snapshot: Path | None = None):
    """CHILD in a child process (a fork of this one on Linux: conftest.run_script)."""
    return run_script(CHILD, [fault, str(arg), str(snapshot or "-"), *COMMON, "--out", str(out),
                              *extra])


@pytest.fixture(scope="module")
def _unfinished_once(tmp_path_factory) -> Path:
    """One run (6 steps, a checkpoint every 2) killed after step 2's checkpoint, made once per
    module: the kill comes after the checkpoint is complete, so every copy is the same folder."""
    out = tmp_path_factory.mktemp("killed") / "unfinished"
    child = _child("kill-after-checkpoint", "2", out, "--steps", "6", "--save-every", "2")
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    return out


@pytest.fixture
def unfinished(_unfinished_once, tmp_path) -> Path:
    """A fresh copy of that killed run's output folder, for one test to damage: --resume
    continues it."""
    out = tmp_path / "unfinished"
    shutil.copytree(_unfinished_once, out, symlinks=True)
    assert _tree(out) == _tree(_unfinished_once)
    return out


RESUME = ["--steps", "6", "--save-every", "2", "--resume"]


# ---- 1. a full disk ------------------------------------------------------------------------
def test_full_disk_at_the_final_save_says_so_and_keeps_the_previous_adapter(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "--steps", "1") == 0
    before = _tree(out)
    size = (out / "adapter_model.safetensors").stat().st_size
    child = _child("fsize-at-final-save", size // 2, out, "--steps", "2", "--overwrite")
    assert child.returncode == 1, child.stderr[-3000:]
    line = _one_line_error(child.stderr)
    assert "File too large" in line or "file-size limit" in line, line
    assert str(out.resolve()) in line and "adapter_model.safetensors" in line, line
    assert _tree(out) == before  # the earlier run's files, byte for byte
    assert sorted(p.name for p in out.parent.iterdir()) == ["run"]  # no hidden leftovers


def test_full_disk_at_a_checkpoint_says_so_and_keeps_the_previous_checkpoint(tmp_path):
    out, snapshot = tmp_path / "run", tmp_path / "before.json"
    # about 1.5 adapters: the checkpoint's adapter file fits, its optimizer state (twice as
    # large) does not: torch.save's failure, "[enforce fail at inline_container.cc] unexpected pos"
    assert _run(tmp_path / "ref", "--steps", "1") == 0
    size = (tmp_path / "ref" / "adapter_model.safetensors").stat().st_size
    child = _child("fsize-at-checkpoint", size * 3 // 2, out, "--steps", "6", "--save-every", "2",
                   snapshot=snapshot)
    assert child.returncode == 1, child.stderr[-3000:]
    line = _one_line_error(child.stderr)
    assert "File too large" in line or "file-size limit" in line, line
    assert "optimizer.pt" in line and str((out / "checkpoint").resolve()) in line, line
    assert "inline_container" not in line and "unexpected pos" not in line
    kept = {name: bytes.fromhex(h) for name, h in json.loads(snapshot.read_text()).items()}
    assert {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()} == kept
    assert read_checkpoint(out / "checkpoint")["state"]["step"] == 2
    assert _run(out, *RESUME) == 0  # and the run goes on from it


def _enospc_when_writing(monkeypatch, name: str) -> None:
    """Make every write to a file called ``name`` fail as on a full disk (ENOSPC)."""
    real = os.write

    def write(fd, data):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json",
                                  "training_args.json", "history.json"])
def test_disk_full_on_any_file_of_the_final_save_names_it(tmp_path, monkeypatch, capsys, name):
    out = tmp_path / "run"
    assert _run(out, "--steps", "1") == 0
    before = _tree(out)
    capsys.readouterr()
    _enospc_when_writing(monkeypatch, name)
    assert _run(out, "--steps", "2", "--overwrite") == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "disk is full" in line and str(out.resolve() / name) in line, line
    monkeypatch.undo()
    assert _tree(out) == before


@pytest.mark.parametrize("name", ["adapter.safetensors", "optimizer.pt", "rng.pt", "state.json"])
def test_disk_full_on_any_file_of_a_checkpoint_names_it(unfinished, monkeypatch, capsys, name):
    before = _tree(unfinished)
    _enospc_when_writing(monkeypatch, name)
    assert _run(unfinished, *RESUME) == 1  # its first checkpoint (step 4) fails
    line = _one_line_error(capsys.readouterr().err)
    assert "disk is full" in line and str(unfinished.resolve() / "checkpoint" / name) in line, line
    monkeypatch.undo()
    assert _tree(unfinished) == before


def test_atomic_write_text_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "notes.json"
    path.write_text("old")
    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "write", full)
        with pytest.raises(atomic.DiskWriteError, match=f"cannot write {path}: the disk is full"):
            atomic.atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["notes.json"]


# ---- 2. the output folder describes one adapter --------------------------------------------
def test_overwrite_whose_save_fails_leaves_the_earlier_runs_settings(tmp_path, monkeypatch, capsys):
    """The earlier run's training_args.json and history.json stay with its adapter."""
    out = tmp_path / "run"
    assert _run(out, "--steps", "1") == 0
    before = _tree(out)

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(adapters, "save_file", full)
    assert _run(out, "--steps", "2", "--lr", "1e-2", "--overwrite") == 1
    _one_line_error(capsys.readouterr().err)
    assert _tree(out) == before
    assert json.loads((out / "training_args.json").read_text())["steps"] == 1


@pytest.mark.parametrize("stage", ["mid-weights", "after-weights", *atomic.STAGES])
def test_sigkill_during_the_final_save_leaves_old_or_new_files_together(tmp_path, stage):
    out, new = tmp_path / "run", tmp_path / "new"
    assert _run(out, "--steps", "1") == 0
    old_files = _tree(out)
    assert _run(new, "--steps", "2") == 0
    new_adapter = load_file(str(new / "adapter_model.safetensors"))
    child = _child("kill-in-final-save", stage, out, "--steps", "2", "--overwrite")
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    atomic.recover(out)  # what the next reader or writer does first
    files = _tree(out)
    assert sorted(files) == RUN_FILES
    if files == old_files:
        assert stage in ("mid-weights", "after-weights", "new-complete")
    else:
        assert stage in ("old-aside", "new-in-place")
        assert json.loads((out / "training_args.json").read_text())["steps"] == 2
        assert len(json.loads((out / "history.json").read_text())["loss"]) == 2
        got = load_file(str(out / "adapter_model.safetensors"))
        assert all(torch.equal(got[k], new_adapter[k]) for k in new_adapter)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "run"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_sigkill_at_a_random_moment_of_the_final_save_leaves_old_or_new_together(tmp_path, seed):
    out = tmp_path / "run"
    assert _run(out, "--steps", "1") == 0
    old_files = _tree(out)
    delay = torch.rand(1, generator=torch.Generator().manual_seed(seed)).item() * 0.02
    child = _child("kill-at-random", f"{delay:.6f}", out, "--steps", "2", "--overwrite")
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    atomic.recover(out)
    files = _tree(out)
    assert sorted(f for f in files if not f.startswith("checkpoint")) == RUN_FILES
    if files != old_files:  # then all four are the new run's
        assert files["training_args.json"] != old_files["training_args.json"]
        assert files["history.json"] != old_files["history.json"]
        assert files["adapter_model.safetensors"] != old_files["adapter_model.safetensors"]
        assert json.loads((out / "training_args.json").read_text())["steps"] == 2


# ---- 3. a damaged training_args.json or state.json -----------------------------------------
def test_corrupted_settings_under_resume_name_the_file_and_what_to_do(unfinished, capsys):
    """A checkpoint from before the settings were kept in it: training_args.json is read."""
    state_path = unfinished / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    if "settings" in state:  # the older layout: settings at the top of the folder only
        (unfinished / "training_args.json").write_text(json.dumps(state.pop("settings")))
        state_path.write_text(json.dumps(state))
    (unfinished / "training_args.json").write_text('{"model": "tiny-qwen2", "r": 4')  # cut short
    assert _run(unfinished, *RESUME) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert str(unfinished / "training_args.json") in line and "not valid JSON" in line, line
    assert "--overwrite" in line


def test_corrupted_state_json_names_the_file_and_what_to_do(unfinished, capsys):
    (unfinished / "checkpoint" / "state.json").write_text("{")
    assert _run(unfinished, *RESUME) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "state.json" in line and "not valid JSON" in line and "--overwrite" in line, line


# ---- 4. NaN in a checkpoint ----------------------------------------------------------------
def test_checkpoint_adapter_holding_nan_is_refused_naming_the_file(unfinished, capsys):
    path = unfinished / "checkpoint" / "adapter.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[3]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(path))
    before = _tree(unfinished)
    assert _run(unfinished, *RESUME) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert str(path) in line and name in line and "NaN" in line, line
    assert _tree(unfinished) == before


def test_checkpoint_optimizer_state_holding_inf_is_refused_naming_the_file(unfinished, capsys):
    path = unfinished / "checkpoint" / "optimizer.pt"
    saved = torch.load(path, weights_only=True)
    first = next(iter(saved["optimizer"]["state"].values()))
    first["exp_avg_sq"].view(-1)[0] = float("inf")
    torch.save(saved, path)
    assert _run(unfinished, *RESUME) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert str(path) in line and "exp_avg_sq" in line and "inf" in line, line


# ---- 5. a hostile optimizer.pt -------------------------------------------------------------
class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_in_optimizer_pt_is_not_run_and_named(unfinished, tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = unfinished / "checkpoint" / "optimizer.pt"
    saved = torch.load(path, weights_only=True)
    saved["optimizer"]["evil"] = _Payload(str(marker))
    torch.save(saved, path, pickle_module=pickle)
    assert _run(unfinished, *RESUME) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert not marker.exists()
    assert str(path) in line and "not be loaded" in line, line
    assert "weights_only" not in line


# ---- 6. careless input ---------------------------------------------------------------------
def test_truncated_optimizer_pt_names_the_file(unfinished, capsys):
    path = unfinished / "checkpoint" / "optimizer.pt"
    path.write_bytes(path.read_bytes()[:500])
    assert _run(unfinished, *RESUME) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert str(path) in line and "--overwrite" in line, line


def test_checkpoint_with_a_file_missing_says_which(unfinished, capsys):
    (unfinished / "checkpoint" / "rng.pt").unlink()
    assert _run(unfinished, *RESUME) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "rng.pt" in line and "--overwrite" in line, line


def test_checkpoint_of_another_runs_settings_is_refused(unfinished, capsys):
    before = _tree(unfinished)
    assert finetune.main([*COMMON, "--lr", "1e-2", "--out", str(unfinished), *RESUME]) == 2
    err = capsys.readouterr().err
    assert "lr: the checkpoint's run has 0.005, this command 0.01" in err
    assert _tree(unfinished) == before


def test_out_that_is_a_file_or_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert _run(tmp_path / "f", "--steps", "1") == 2
    assert "is a file; give a folder" in _one_line_error(capsys.readouterr().err)
    assert _run(tmp_path / "f" / "sub", "--steps", "1") == 2
    line = _one_line_error(capsys.readouterr().err)
    assert str(tmp_path / "f") in line and "not a folder" in line, line
    assert (tmp_path / "f").read_text() == "x"


def test_unwritable_output_folder_is_one_line(tmp_path, monkeypatch, capsys):
    """(Tests run as root here, where chmod does not refuse: the refusal is injected.)"""
    real = os.mkdir

    def mkdir(path, *args, **kwargs):
        if str(tmp_path / "locked") in str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    assert _run(tmp_path / "locked", "--steps", "1") in (1, 2)
    line = _one_line_error(capsys.readouterr().err)
    assert "locked" in line and "ermission denied" in line, line


def test_resume_of_an_unfinished_run_that_holds_no_settings_says_so(tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert _run(out, *RESUME) == 2
    assert "no run to continue" in _one_line_error(capsys.readouterr().err)


def test_checkpoint_of_other_tensors_or_another_number_of_processes_is_refused(unfinished, capsys):
    path = unfinished / "checkpoint" / "adapter.safetensors"
    tensors = load_file(str(path))
    gone = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != gone}, str(path))
    assert _run(unfinished, *RESUME) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert str(path) in line and "does not hold this run's adapter" in line and gone in line, line
    save_file(tensors, str(path))
    rng = unfinished / "checkpoint" / "rng.pt"
    states = torch.load(rng, weights_only=True)
    torch.save(states * 2, rng)  # as if written by two processes
    assert _run(unfinished, *RESUME) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "written by 2 process(es), this run has 1" in line, line


def test_killed_overwrite_run_resumes_by_its_own_settings_not_the_folders_earlier_ones(tmp_path, capsys):
    """--overwrite of run A by run B (another lr), killed after B's first checkpoint: the folder
    still holds A's four files, B's checkpoint carries B's settings, and --resume continues B."""
    out = tmp_path / "run"
    assert _run(out, "--steps", "1") == 0
    a_files = _tree(out)
    child = _child("kill-after-checkpoint", "2", out, "--steps", "6", "--save-every", "2",
                   "--lr", "1e-2", "--overwrite")
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert {k: v for k, v in _tree(out).items() if not k.startswith("checkpoint")} == a_files
    capsys.readouterr()
    assert _run(out, *RESUME) == 2  # A's lr: not the run the checkpoint continues
    assert "lr: the checkpoint's run has 0.01, this command 0.005" in capsys.readouterr().err
    assert finetune.main([*COMMON, "--lr", "1e-2", "--out", str(out), *RESUME]) == 0
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES
    assert json.loads((out / "training_args.json").read_text())["lr"] == 1e-2


def test_remove_folder_interrupted_leaves_nothing_half_and_is_cleaned_up(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "a").write_text("a")
    monkeypatch.setattr("shutil.rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # renamed aside, then interrupted while deleting
        atomic.remove_folder(folder)
    monkeypatch.undo()
    assert not folder.exists() and len(list(tmp_path.iterdir())) == 1  # the hidden one, whole
    atomic.recover(folder)  # never brings a folder being deleted back
    assert list(tmp_path.iterdir()) == []


def test_save_adapter_extra_files_go_in_the_same_swap_and_bad_names_are_refused(tmp_path):
    from torch import nn

    from loracore.surgery import inject
    model = inject(nn.Sequential(nn.Linear(8, 8)), ["0"], r=2, lora_alpha=4)
    folder = adapters.save_adapter(model, tmp_path / "ad", extra_files={"notes.json": "{}\n"})
    assert (folder / "notes.json").read_text() == "{}\n"
    before = _tree(tmp_path)
    for name in ["adapter_config.json", "adapter_model.safetensors", "../x", ".hidden", "a/b", ""]:
        with pytest.raises(ValueError, match="extra_files: .* is not a plain file name"):
            adapters.save_adapter(model, folder, extra_files={name: "x"})
    assert _tree(tmp_path) == before


def test_resume_of_a_folder_with_settings_but_no_adapter_does_not_say_the_run_finished(tmp_path, capsys):
    """A folder holding only a (damaged) training_args.json: no checkpoint to resume, and no
    claim that an adapter was saved there."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "training_args.json").write_text("{broken")
    assert _run(out, "--steps", "2", "--resume") == 2
    err = _one_line_error(capsys.readouterr().err)
    assert "no checkpoint folder" in err and "its adapter is saved" not in err
    assert [p.name for p in out.iterdir()] == ["training_args.json"]  # nothing written
