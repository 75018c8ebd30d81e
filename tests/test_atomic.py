"""loracore.atomic under concurrency: writes of one folder at once run one after the other, a
reader's recover() never breaks a live write, and a killed writer leaves no lock behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from loracore.atomic import recover, remove_folder, write_folder

ROOT = Path(__file__).resolve().parents[1]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".loracore-" in p.name)


def test_concurrent_saves_and_recovers_of_one_folder_all_succeed_and_leave_one_whole_folder(tmp_path):
    folder = tmp_path / "adapter"
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        def fill(tmp: Path) -> None:
            (tmp / "a.txt").write_text(str(k))
            time.sleep(0.002)  # widen the window another writer's recover() would hit
            (tmp / "b.txt").write_text(str(k))
        try:
            for _ in range(15):
                write_folder(folder, fill)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(60):
                recover(folder)
                if folder.is_dir():  # a whole folder under its name, always: both files, one writer
                    a, b = (folder / "a.txt").read_text(), (folder / "b.txt").read_text()
                    assert a == b, (a, b)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert (folder / "a.txt").read_text() == (folder / "b.txt").read_text()
    assert _leftovers(tmp_path) == []


def test_a_writer_killed_while_it_holds_the_lock_leaves_no_lock_and_the_old_folder(tmp_path):
    folder = tmp_path / "adapter"
    write_folder(folder, lambda tmp: (tmp / "a.txt").write_text("old"))
    ready = tmp_path / "ready"
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from loracore.atomic import write_folder
        def fill(tmp):
            (tmp / "a.txt").write_text("new")
            Path({str(ready)!r}).touch()
            time.sleep(60)
        write_folder(Path({str(folder)!r}), fill)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the writer never started"
            time.sleep(0.05)
        # the writer holds the lock: a second write waits for it ...
        done = threading.Event()
        waiter = threading.Thread(target=lambda: (write_folder(folder, lambda t: (t / "a.txt")
                                                              .write_text("third")), done.set()))
        waiter.start()
        time.sleep(0.5)
        assert not done.is_set()
        assert (folder / "a.txt").read_text() == "old"
        # ... and goes ahead as soon as the writer is killed
        os.kill(proc.pid, signal.SIGKILL)
        waiter.join(timeout=30)
        assert done.is_set()
    finally:
        proc.kill()
        proc.wait()
    assert (folder / "a.txt").read_text() == "third"
    assert _leftovers(tmp_path) == []
    remove_folder(folder)
    assert not folder.exists() and _leftovers(tmp_path) == []
