"""The course's drawn figures (``tools/figures.py`` -> ``docs/figures/``): the numbers in the TIES
figure are the library's, the committed PNGs are what the script draws, and the lessons show them.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import figures  # noqa: E402

from loracore import merge as M  # noqa: E402

#: where each figure is shown: the lesson, and words of the Markdown cell before the figure's cell
SHOWN_IN = {"lora_layer.png": ("02_lora_layer.ipynb", "## 1. The forward pass"),
            "ties_merge.png": ("08_merging_adapters.ipynb", "## 2. Task vectors and task arithmetic")}
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def test_the_ties_figure_shows_what_loracore_and_peft_compute():
    steps = figures.ties_steps()
    tasks = list(steps.tasks)
    ones = torch.ones(len(tasks))
    assert torch.equal(steps.merged, M.ties(tasks, ones, figures.DENSITY))
    assert torch.equal(steps.plain_sum, M.task_arithmetic(tasks, ones))
    peft_merge = pytest.importorskip("peft.utils.merge_utils")
    assert torch.equal(steps.merged, peft_merge.ties(tasks, ones, figures.DENSITY))
    for task, trimmed in zip(tasks, steps.trimmed):
        assert torch.equal(trimmed, peft_merge.prune(task, figures.DENSITY, "magnitude"))
    # the figure's example must not depend on how topk breaks ties at the trim's threshold
    keep = int(figures.DENSITY * tasks[0].numel())
    for task in tasks:
        mags = task.abs().flatten().sort(descending=True).values
        assert mags[keep - 1] > mags[keep], f"a magnitude tie at the trim threshold in {task.tolist()}"
    # and it shows what the figure's text says it shows: mass beats the count of votes somewhere
    # (two kept negatives against one larger positive), and one entry the trim empties everywhere
    kept = steps.trimmed != 0
    votes = (steps.trimmed.sign() * kept).sum(dim=0)
    assert ((steps.mass > 0) & (votes < 0)).any(), "no entry where the summed mass outvotes the count"
    assert (~kept.any(dim=0)).any() and (steps.merged[~kept.any(dim=0)] == 0).all()


def test_the_committed_figures_are_what_the_script_draws(tmp_path):
    drawn = figures.draw_all(tmp_path)
    assert [p.name for p in drawn] == sorted(SHOWN_IN)
    for new in drawn:
        committed = ROOT / "docs" / "figures" / new.name
        assert committed.is_file(), f"docs/figures/{new.name} is missing: run `python tools/figures.py`"
        with Image.open(committed) as old_png, Image.open(new) as new_png:
            assert old_png.format == new_png.format == "PNG"
            assert old_png.size == new_png.size, (
                f"docs/figures/{new.name} is {old_png.size} pixels, the script draws {new_png.size}: "
                "run `python tools/figures.py` and commit the figure")
            info = old_png.text
        assert info.get("Source") == "tools/figures.py" and "Software" not in info
        # the bytes depend on matplotlib's version (its renderer and fonts): compare them only
        # with the version that drew the committed file
        if info.get("Comment") == figures.metadata()["Comment"]:
            assert committed.read_bytes() == new.read_bytes(), (
                f"docs/figures/{new.name} differs from what tools/figures.py draws: run it and commit")


@pytest.mark.parametrize("name", sorted(SHOWN_IN))
def test_each_figure_is_shown_in_its_lesson_with_alt_text(name):
    lesson, after = SHOWN_IN[name]
    nb = nbformat.read(ROOT / "lessons" / lesson, as_version=4)
    hits = [(i, alt) for i, c in enumerate(nb.cells) if c.cell_type == "markdown"
            for alt, target in _IMAGE.findall(c.source) if target == f"../docs/figures/{name}"]
    assert len(hits) == 1, f"lessons/{lesson} should show ../docs/figures/{name} once, found {len(hits)}"
    i, alt = hits[0]
    assert len(alt.split()) >= 4, f"lessons/{lesson}: the figure's alt text is too short: {alt!r}"
    before = [j for j, c in enumerate(nb.cells) if c.cell_type == "markdown" and after in c.source]
    assert before and before[0] < i, f"lessons/{lesson}: the figure should come after {after!r}"
