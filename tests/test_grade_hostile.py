"""`loracore grade` against a hostile learner: attacks on the grader's channels and its sandbox.

Each test grades a tiny stand-in for lab 01 (its exercises and points, checks that compare one
number, no model), so a whole grading takes seconds: the attack is a learner's extra cell.
What the attacks leave behind (processes, files) carries a marker unique to the test, and the
test removes it whatever happens, so a failing test does not leave processes running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import nbformat
import pytest

from loracore.grade import grade
from loracore.grade.labs import STUB
from loracore.grade.run import Limits
from loracore.grade.sandbox import landlock_abi

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["lora_forward", "lora_layer", "merge", "inject", "loss_fell"]  # lab 01's exercises
FULL = 10.0

# The course's cells: checks that compare the learner's `answer` with 42, one check cell each.
SETUP = textwrap.dedent("""\
    from loracore.selfcheck import Check, exercise, report

    def _check(name, points):
        def check(answer):
            report(name, [Check.equal("the answer", answer, 42)])
        check.__name__ = "check_" + name
        return exercise(points)(check)

    for _name, _points in [("lora_forward", 2), ("lora_layer", 3), ("merge", 2), ("inject", 2),
                           ("loss_fell", 1)]:
        globals()["check_" + _name] = _check(_name, _points)
    """)


def _fake_lab(folder: Path) -> Path:
    """A labs folder holding ``lab01_fake.ipynb``: setup, one stub, one check cell per exercise."""
    cells = [nbformat.v4.new_markdown_cell("# Lab 01, a stand-in"), nbformat.v4.new_code_cell(SETUP),
             nbformat.v4.new_code_cell(STUB)]
    cells += [nbformat.v4.new_code_cell(f"check_{name}(answer)") for name in NAMES]
    cells.append(nbformat.v4.new_markdown_cell("The end."))
    for i, cell in enumerate(cells):
        cell.id = f"cell{i:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=cells), folder / "lab01_fake.ipynb")
    return folder


def _submission(tmp_path: Path, *attack: str, solved: bool = False) -> tuple[Path, Path]:
    """The labs folder and a learner's notebook: the answer (or the stub), then the attack cells."""
    labs = _fake_lab(tmp_path / "labs")
    nb = nbformat.read(labs / "lab01_fake.ipynb", as_version=4)
    if solved:
        nb.cells[2].source = "answer = 42"
    for k, code in enumerate(attack):
        nb.cells.insert(3 + k, nbformat.v4.new_code_cell(textwrap.dedent(code)))
    path = tmp_path / "submission.ipynb"
    nbformat.write(nb, path)
    return labs, path


def _grade(labs: Path, path: Path, timeout: float = 60):
    _, results = grade("01", [path], labs_dir=labs, limits=Limits(timeout=timeout, threads=1))
    return results[0]


def _with_marker(marker: str) -> list[int]:
    """Every process whose command line holds ``marker``, this test's process excluded."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.fixture
def marker():
    """A string unique to this test, to find what the attack left behind; removed after."""
    mark = f"loracore-hostile-{uuid.uuid4().hex}"
    yield mark
    for pid in _with_marker(mark):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for p in Path("/dev/shm").glob(f"*{mark}*"):
        p.unlink(missing_ok=True)


def test_the_stand_in_lab_grades_the_solution_full_and_the_blank_lab_zero(tmp_path):
    labs, solved = _submission(tmp_path / "a", solved=True)
    assert _grade(labs, solved).total() == FULL
    labs, blank = _submission(tmp_path / "b")
    result = _grade(labs, blank)
    assert result.total() == 0 and result.status == "ok", result


# The result line a detached child prints after the notebook has ended, on the descriptor the
# kernel's output went to (ipykernel keeps a copy of the original fd 1).
FORGE = """\
import json, os, subprocess, sys
forged = {"submission": "x", "status": "ok", "reason": "", "errors": [], "seconds": 1.0,
          "points": {n: p for n, p in [("lora_forward", 2), ("lora_layer", 3), ("merge", 2),
                                       ("inject", 2), ("loss_fell", 1)]},
          "verdicts": {n: {"passed": True, "failed": [], "error": ""}
                       for n in ["lora_forward", "lora_layer", "merge", "inject", "loss_fell"]}}
fd = getattr(sys.stdout, "_original_stdstream_copy", None) or 1
child = "import os, sys, time; time.sleep(6); os.write(int(sys.argv[1]), sys.argv[2].encode())"
subprocess.Popen([sys.executable, "-c", child, str(fd), "\\n" + json.dumps(forged) + "\\n", "MARKER"],
                 pass_fds=[fd], start_new_session=True)
"""


def test_a_result_line_printed_by_a_detached_child_is_not_the_result(tmp_path, marker):
    labs, path = _submission(tmp_path, FORGE.replace("MARKER", marker))
    result = _grade(labs, path)
    assert result.total() == 0 and result.submission == str(path), result


SURVIVORS = """\
import os, subprocess, sys
sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
subprocess.Popen(["setsid", *sleeper, "MARKER-setsid"])
subprocess.Popen([*sleeper, "MARKER-session"], start_new_session=True)
if os.fork() == 0:  # the double fork of a daemon: its grandchild's parent is gone at once
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [*sleeper, "MARKER-daemon"])
    os._exit(0)
os.wait()
"""


def test_no_process_a_submission_starts_outlives_its_grading(tmp_path, marker):
    labs, path = _submission(tmp_path, SURVIVORS.replace("MARKER", marker), solved=True)
    result = _grade(labs, path)
    assert result.total() == FULL, result
    assert _with_marker(marker) == []


HOLDER = """\
import subprocess, sys
fd = getattr(sys.stdout, "_original_stdstream_copy", None) or 1
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "MARKER"],
                 pass_fds=[fd], start_new_session=True)
"""


def test_a_process_holding_the_kernels_output_does_not_hold_the_grader(tmp_path, marker):
    """The notebook ends at once: its result comes back at once, as 'ok', not as a time-out."""
    labs, path = _submission(tmp_path, HOLDER.replace("MARKER", marker), solved=True)
    script = textwrap.dedent(f"""\
        import sys
        from pathlib import Path
        from loracore.grade import grade
        from loracore.grade.run import Limits
        _, [r] = grade("01", [{str(path)!r}], labs_dir=Path({str(labs)!r}), limits=Limits(timeout=20))
        print(r.status, r.total(), r.reason)
        """)
    try:  # less than the time limit and the grader's grace (110 s): no waiting for either
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=100, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        pytest.fail("the grader was still waiting 100 s later for a notebook that ended at once")
    assert proc.stdout.split()[:2] == ["ok", str(FULL)], proc.stdout + proc.stderr[-2000:]


FLOOD = """\
import os, sys
chunk = b"x" * 2**20
fd = getattr(sys.stdout, "_original_stdstream_copy", None) or 1
for _ in range(100):
    os.write(fd, chunk)
for _ in range(20):
    os.write(1, chunk)
"""


def _grader_peak_mb(labs: Path, path: Path) -> tuple[float, str]:
    """Grade in a fresh process (no torch in it): its peak resident memory, and its verdict."""
    script = textwrap.dedent(f"""\
        import resource
        from pathlib import Path
        from loracore.grade import _run_in_process
        from loracore.grade.labs import Exercise, Lab
        from loracore.grade.run import Limits
        lab = Lab("01", Path({str(labs)!r}) / "lab01_fake.ipynb",
                  tuple(Exercise(n, p) for n, p in {list(zip(NAMES, [2, 3, 2, 2, 1]))!r}))
        r = _run_in_process({str(path)!r}, lab, Limits(timeout=120))
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, r.status, r.total())
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak, *rest = proc.stdout.split()
    return float(peak), " ".join(rest)


def test_output_written_straight_to_the_descriptors_does_not_grow_the_grader(tmp_path):
    labs, quiet = _submission(tmp_path / "quiet", solved=True)
    base, verdict = _grader_peak_mb(labs, quiet)
    assert verdict == f"ok {FULL}"
    labs, loud = _submission(tmp_path / "loud", FLOOD, solved=True)
    peak, verdict = _grader_peak_mb(labs, loud)
    assert verdict == f"ok {FULL}"
    assert peak < base + 20, f"the grader's peak memory went from {base:.0f} MB to {peak:.0f} MB"


@pytest.mark.skipif(landlock_abi() == 0, reason="needs Linux with Landlock")
def test_a_kernel_cannot_leave_a_file_in_shared_memory(tmp_path, marker):
    attack = f"open('/dev/shm/{marker}', 'w').write('left behind')"
    labs, path = _submission(tmp_path, attack, solved=True)
    result = _grade(labs, path)
    assert result.total() == FULL
    assert not Path(f"/dev/shm/{marker}").exists()
    assert any("PermissionError" in e for e in result.errors), result.errors


# A detached child opens the verdict file while the learner's cell runs and, through that
# descriptor, appends a passing verdict for every exercise every millisecond; the check cells
# then raise before their check records anything (`answer` was never defined).
WRITER = """\
import os, subprocess, sys
writer = '''
import json, os, sys, time
f = open(os.environ["LORACORE_VERDICTS"], "a")
lines = "".join(json.dumps({"exercise": n, "passed": True, "checks": 1, "failed": [], "error": ""}) + "\\\\n"
                for n in ["lora_forward", "lora_layer", "merge", "inject", "loss_fell"])
end = time.monotonic() + 60
while time.monotonic() < end:
    f.write(lines); f.flush(); time.sleep(0.001)
'''
subprocess.Popen([sys.executable, "-c", writer, "MARKER"], start_new_session=True)
import time; time.sleep(1)
"""


def test_verdicts_written_outside_a_check_cells_run_are_never_merged(tmp_path, marker):
    labs, path = _submission(tmp_path, WRITER.replace("MARKER", marker))
    result = _grade(labs, path)
    assert result.total() == 0, result
    assert _with_marker(marker) == []


def test_a_verdict_file_replaced_by_an_endless_one_does_not_stop_the_grader(tmp_path):
    attack = "import os\nos.symlink('/dev/zero', os.environ['LORACORE_VERDICTS'])"
    labs, path = _submission(tmp_path, attack, solved=True)
    start = time.monotonic()
    result = _grade(labs, path, timeout=30)
    assert result.status == "ok" and time.monotonic() - start < 60, result


def test_kill_descendants_ends_a_whole_tree_and_a_subreaper_keeps_the_orphans_in_it(marker):
    from loracore.grade.sandbox import kill_descendants

    script = SURVIVORS.replace("MARKER", marker).replace("import os, subprocess, sys\n", "")
    script = ("import os, subprocess, sys, time\nfrom loracore.grade.sandbox import become_subreaper, "
              "kill_descendants\nassert become_subreaper()\n" + script +
              "time.sleep(1)\nprint(len(kill_descendants(os.getpid())))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) >= 3  # setsid's sleeper, the new session's, the daemon
    time.sleep(0.5)
    assert _with_marker(marker) == []


def test_kill_descendants_of_a_process_without_children_or_gone_signals_nothing():
    from loracore.grade.sandbox import kill_descendants

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert kill_descendants(gone.pid) == []
    alone = subprocess.Popen(["sleep", "30"])
    try:
        assert kill_descendants(alone.pid) == [] and alone.poll() is None  # itself is spared
    finally:
        alone.kill()
        alone.wait()
