"""How a failed self-check reaches the learner in Jupyter (the browser test sees it on the page)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loracore.checks import lab01
from loracore.selfcheck import ExerciseFailed

ROOT = Path(__file__).resolve().parents[1]


def lora_forward(*args):  # the lab's stub, unsolved
    raise NotImplementedError("Exercise: replace this line with your code.")


def test_ipython_shows_a_failed_check_as_its_message_not_a_traceback():
    """IPython calls `_render_traceback_` instead of formatting the frames (loracore's own code)."""
    with pytest.raises(ExerciseFailed) as info:
        lab01.check_lora_forward(lora_forward)
    lines = info.value._render_traceback_()
    assert len(lines) == 1
    assert "ExerciseFailed" in lines[0] and "lora_forward is not written yet" in lines[0]
    assert "Traceback" not in lines[0] and "selfcheck.py" not in lines[0]


def test_ipython_renders_it_that_way(tmp_path):
    """The real IPython shell, as ipykernel runs a cell: one line, the message, no frames.
    In a child process, so that no IPython shell (and its history file) is left in this one."""
    script = """
import json
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
shown = []
shell._showtraceback = lambda etype, evalue, stb: shown.append(stb)  # what ipykernel sends to Jupyter
shell.run_cell("from loracore.checks import lab01\\n"
               "def lora_forward(*a): raise NotImplementedError('stub')\\n"
               "lab01.check_lora_forward(lora_forward)")
print(json.dumps(shown))
"""
    env = {**os.environ, "IPYTHONDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    shown = json.loads(out.strip().splitlines()[-1])
    assert len(shown) == 1 and len(shown[0]) == 1, shown
    assert "lora_forward is not written yet" in shown[0][0] and "Traceback" not in shown[0][0]
