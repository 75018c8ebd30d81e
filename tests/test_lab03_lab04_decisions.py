"""Labs 03 and 04: the decision exercises and reflection questions, checked and graded.

Lab 03's learner chooses an NF4 block size and double quantization for a memory budget within an
error bound; lab 04's learner chooses a merge method and density from a sweep. Each check measures
the choice itself (lab 03 quantizes the weight again, lab 04 merges and scores again), so a typed
answer that the run does not support fails, with a message saying by how much.

The fast tests call the checks directly (no kernel, no model): a verdict is read from the file
``$LORACORE_VERDICTS`` names, as the grader reads it. The slow ones grade one batch per lab through
``loracore grade`` (solved, blank, partly wrong, tampered), each notebook in its own kernel in short
mode, and assert the exact totals.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
import torch

from loracore.checks import lab03, lab04
from loracore.grade.gradebook import feedback_name
from loracore.selfcheck import VERDICTS_ENV, ExerciseFailed

from test_grade import _cell, _grade_cli, _learner, _with_answer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SOLUTION03 = ROOT / "solutions" / "lab03_qlora.ipynb"
SOLUTION04 = ROOT / "solutions" / "lab04_merge_adapters.ipynb"


@pytest.fixture
def verdicts(tmp_path, monkeypatch):
    """Call a check; return (passed, the failed checks' text) as the grader would record them."""
    path = tmp_path / "verdicts.jsonl"
    monkeypatch.setenv(VERDICTS_ENV, str(path))

    def run(check, *args):
        path.unlink(missing_ok=True)
        try:
            check(*args)
        except ExerciseFailed:
            pass
        (verdict,) = [json.loads(line) for line in path.read_text().splitlines()]
        return verdict["passed"], json.dumps(verdict["failed"]) + verdict["error"]
    return run


def _markdown(path: Path) -> str:
    return "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")


def _outputs(path: Path, start: str) -> str:
    cell = next(c for c in nbformat.read(path, as_version=4).cells if c.source.startswith(start))
    return "".join(o.get("text", "") for o in cell.outputs)


# --------------------------------------------------------------------------- lab 03: the decision


def _heavy_tailed(shape=(256, 512), seed=0) -> torch.Tensor:
    """A weight like a trained one: mostly normal, a few large entries (Student's t, 8 dof). Its
    NF4 errors are within 0.4 points of those of the course model's first query projection."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(shape, generator=g)
    chi2 = sum(torch.randn(shape, generator=g) ** 2 for _ in range(8)) / 8
    return 0.02 * normal / chi2.sqrt()


def test_nf4_cost_counts_every_stored_byte_and_the_error_of_loracores_nf4():
    w = _heavy_tailed()
    bits, error = lab03.nf4_cost(w, 64, True)
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel())
    assert lab03.nf4_cost(w, 64, False)[0] == 4.5
    assert 0.05 < error < 0.2
    errors = [lab03.nf4_cost(w, bs, False)[1] for bs in (32, 256, 4096)]
    assert errors == sorted(errors)  # larger blocks, larger error


def test_the_stored_sweep_admits_two_choices_and_refuses_the_tempting_ones():
    """From the solution's stored table (the real weight, full run): the budget and bound leave
    more than one right answer, and QLoRA's own setting, no double quantization, or a huge block
    each miss one of them."""
    text = _outputs(SOLUTION03, "# every block size, double quantization off and on")
    assert f"<= {lab03.BUDGET_BITS} bits" in text and f"<= {lab03.ERROR_BOUND:.0%} relative" in text
    rows = re.findall(r"^\s*(\d+) \|\s+([\d.]+)\s+([\d.]+)% \|\s+([\d.]+)\s+([\d.]+)%", text, re.M)
    assert len(rows) == 7, text
    table = {}
    for bs, b0, e0, b1, e1 in rows:
        table[int(bs), False] = (float(b0), float(e0) / 100)
        table[int(bs), True] = (float(b1), float(e1) / 100)
    meets = {k for k, (b, e) in table.items() if b <= lab03.BUDGET_BITS and e <= lab03.ERROR_BOUND}
    assert len(meets) >= 2 and (128, True) in meets, meets
    for tempting in ((64, True), (64, False), (256, False), (4096, False), (4096, True)):
        assert tempting not in meets


def test_the_nf4_choice_fails_saying_by_how_much(verdicts):
    w = _heavy_tailed()
    bits128, err128 = lab03.nf4_cost(w, 128, True)
    assert bits128 <= lab03.BUDGET_BITS and err128 <= lab03.ERROR_BOUND
    assert verdicts(lab03.check_nf4_choice, 128, True, w) == (True, "[]")
    passed, why = verdicts(lab03.check_nf4_choice, 64, False, w)
    assert not passed and "4.5000 bits, 0.4000 over the budget" in why
    passed, why = verdicts(lab03.check_nf4_choice, 512, True, w)
    assert not passed and "points over the bound" in why and "memory" not in why
    for bad in ((100, True), (64, "yes"), ("64", True)):
        passed, why = verdicts(lab03.check_nf4_choice, *bad, w)
        assert not passed and "a block size and a double quantization to measure" in why


def test_lab03_reflections_are_scored_from_the_learners_choice(verdicts):
    w = _heavy_tailed()
    constants = lab03.nf4_cost(w, 256, True)[0] - 4
    assert verdicts(lab03.check_constant_bits, constants, 256, True, w)[0]
    assert verdicts(lab03.check_constant_bits, 8 / 256 + 32 / (256 * 256), 256, True, w)[0]  # the formula
    passed, why = verdicts(lab03.check_constant_bits, 4 + constants, 256, True, w)
    assert not passed and "subtract them" in why
    assert not verdicts(lab03.check_constant_bits, 0.5, 256, True, w)[0]
    saved = 7e9 * ((8 / 64 + 32 / (64 * 256)) - (8 / 256 + 32 / (256 * 256))) / 8 / 1e9
    assert verdicts(lab03.check_saved_gb, saved, 256, True)[0]
    assert verdicts(lab03.check_saved_gb, 0.0, 64, True)[0]
    assert verdicts(lab03.check_saved_gb, 7e9 * (4.126953125 - 4.5) / 8 / 1e9, 64, False)[0]
    assert not verdicts(lab03.check_saved_gb, saved * 1.1, 256, True)[0]
    assert not verdicts(lab03.check_saved_gb, True, 64, True)[0]
    assert verdicts(lab03.check_why_error_grows, " B")[0]
    passed, why = verdicts(lab03.check_why_error_grows, "d")
    assert not passed and "the bits column falls" in why
    assert not verdicts(lab03.check_why_error_grows, 2)[0]


def test_lab03_and_lab04_show_the_options_their_checks_score():
    for path, options in ((SOLUTION03, lab03.WHY_ERROR_GROWS), (SOLUTION04, lab04.WHY_RESCALE)):
        text = _markdown(path)
        for letter, option in options.items():
            assert f"* **{letter}.** {option}" in text, (path.name, letter)


# --------------------------------------------------------------------------- lab 04: the decision

DELTAS = [torch.randn(6, 9, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
W = torch.tensor([1.0, 1.0])
SWEEP = {("linear", 1.0): (0.5, 0.25), ("ties", 0.3): (0.625, 0.25), ("ties", 0.7): (0.5, 0.125),
         ("dare", 0.3): (0.25, 0.0), ("dare", 0.7): (0.625, 0.125)}
RESULTS = {"capitals adapter alone": (0.625, 0.0), "records adapter alone": (0.0, 0.5)}


def _merged_scores(table: dict):
    """The lab's merged_scores, stood in for: which sweep row a merge function computes, by
    merging two fixed tensors, and that row's scores."""
    outputs = {k: lab04.merge_fn(*k, W)(DELTAS) for k in table}

    def merged_scores(fn):
        got = fn(DELTAS)
        (row,) = [k for k, out in outputs.items() if torch.equal(got, out)]
        return table[row]
    return merged_scores


def test_merge_fn_is_loracores_merge_and_dare_draws_the_same_masks_each_time():
    from loracore import merge as M

    assert torch.equal(lab04.merge_fn("linear", 1.0, W)(DELTAS), M.task_arithmetic(DELTAS, W))
    assert torch.equal(lab04.merge_fn("ties", 0.3, W)(DELTAS), M.ties(DELTAS, W, 0.3))
    dare = lab04.merge_fn("dare", 0.5, W)
    first = dare(DELTAS)
    assert torch.equal(first, lab04.merge_fn("dare", 0.5, W)(DELTAS))
    assert not torch.equal(first, dare(DELTAS))  # one stream across layers, not one mask reused
    for bad in (("slerp", 0.5), ("ties", 0.0), ("ties", 1.5), ("linear", 0.5), ("dare", True)):
        with pytest.raises(ValueError, match="lab04 merge_fn"):
            lab04.merge_fn(*bad, W)


def test_the_merge_choice_accepts_ties_within_one_question_and_says_by_how_much_it_misses(verdicts):
    scores = _merged_scores(SWEEP)
    # rows right of 16: linear 6, ties 0.3 7, ties 0.7 5, dare 0.3 2, dare 0.7 6
    for choice in (("ties", 0.3), ("linear", 1.0), ("dare", 0.7)):
        assert verdicts(lab04.check_merge_choice, choice, SWEEP, scores, W, 8) == (True, "[]"), choice
    passed, why = verdicts(lab04.check_merge_choice, ("ties", 0.7), SWEEP, scores, W, 8)
    assert not passed and "5 right, 1 too few" in why and "ties at density 0.3 gets 7" in why
    passed, why = verdicts(lab04.check_merge_choice, ("ties", 0.5), SWEEP, scores, W, 8)
    assert not passed and "one of the merges in the sweep" in why
    # a table edited to make a poor choice look best: merged again, it scores what it scores
    forged = {**SWEEP, ("dare", 0.3): (1.0, 1.0)}
    passed, why = verdicts(lab04.check_merge_choice, ("dare", 0.3), forged, scores, W, 8)
    assert not passed and "merged again, it scores what your table says" in why


def test_lab04_reflections_are_scored_from_the_table(verdicts):
    # alone: 5 + 4 right; ties 0.3: 5 + 2
    assert verdicts(lab04.check_merge_cost, 2, ("ties", 0.3), SWEEP, RESULTS, 8)[0]
    assert not verdicts(lab04.check_merge_cost, 3, ("ties", 0.3), SWEEP, RESULTS, 8)[0]
    assert verdicts(lab04.check_merge_cost, 7, ("dare", 0.3), SWEEP, RESULTS, 8)[0]
    assert verdicts(lab04.check_which_task_lost, "records", ("ties", 0.3), SWEEP, RESULTS)[0]
    assert verdicts(lab04.check_which_task_lost, "records", ("dare", 0.3), SWEEP, RESULTS)[0]
    capitals_lose = {("linear", 1.0): (0.25, 0.5)}
    assert verdicts(lab04.check_which_task_lost, "capitals", ("linear", 1.0), capitals_lose, RESULTS)[0]
    passed, why = verdicts(lab04.check_which_task_lost, "capitals", ("ties", 0.3), SWEEP, RESULTS)
    assert not passed and "records" in why
    tie = {("linear", 1.0): (0.5, 0.375)}  # both lose one question
    assert verdicts(lab04.check_which_task_lost, "Same", ("linear", 1.0), tie, RESULTS)[0]
    assert verdicts(lab04.check_why_rescale, "c")[0]
    passed, why = verdicts(lab04.check_why_rescale, "b")
    assert not passed and "DARE alone elects no sign" in why


# --------------------------------------------------------------------------- grading a class

LAB03_COLUMNS = ("nf4_code_book", "quantize_blocks", "pack", "dequantize", "double_quantize",
                 "full_pipeline", "nf4_choice", "constant_bits", "saved_gb", "why_error_grows", "total")
LAB04_COLUMNS = ("trim", "elect", "disjoint_mean", "drop_and_rescale", "ties", "merge_choice",
                 "merge_cost", "which_task_lost", "why_rescale", "total")


def _answer_cell(nb, start: str) -> str:
    """The id of the solution's answer cell whose answer starts with ``start``."""
    return next(c.id for c in nb.cells if "### BEGIN SOLUTION" in c.source and start in c.source)


def _check_cell(nb, call: str) -> str:
    return next(c.id for c in nb.cells if c.source.startswith(call))


@pytest.mark.slow
def test_a_lab03_class_gets_the_expected_totals(tmp_path):
    solution = _learner(SOLUTION03)
    folder = tmp_path / "class"
    folder.mkdir()
    nbformat.write(solution, folder / "solved.ipynb")
    nbformat.write(_learner(ROOT / "labs" / "lab03_qlora.ipynb"), folder / "blank.ipynb")
    # Partly wrong: the nibbles swapped (pack, dequantize and the pipeline fail), QLoRA's own
    # setting chosen (over the memory budget), a wrong reason; the two sums on that choice right.
    pack = _answer_cell(solution, "pack_nibbles")
    wrong = _with_answer(solution, pack, "(q[0::2] << 4) | q[1::2]", "(q[1::2] << 4) | q[0::2]")
    wrong = _with_answer(wrong, pack, "[packed >> 4, packed & 0x0F]", "[packed & 0x0F, packed >> 4]")
    choice = _answer_cell(solution, "BLOCKSIZE")
    wrong = _with_answer(wrong, choice, "BLOCKSIZE = 128", "BLOCKSIZE = 64")
    wrong = _with_answer(wrong, _answer_cell(solution, "WHY_ERROR"), 'WHY_ERROR = "b"', 'WHY_ERROR = "a"')
    nbformat.write(wrong, folder / "partly_wrong.ipynb")
    # Tampered: a huge block (misses the error bound) and its check cell edited to pass.
    tampered = _with_answer(solution, choice, "BLOCKSIZE = 128", "BLOCKSIZE = 4096")
    _cell(tampered, _check_cell(solution, "lab03.check_nf4_choice(")).source = \
        "print('your NF4 choice: all 2 checks passed.')"
    nbformat.write(tampered, folder / "tampered.ipynb")

    graded = _grade_cli(tmp_path, "lab03", folder, jobs=2)
    rows = {Path(k).name: {c: r[c] for c in LAB03_COLUMNS} for k, r in graded["rows"].items()}
    full = dict(zip(LAB03_COLUMNS, ("1", "2", "2", "2", "2", "1", "2", "1", "1", "1", "15")))
    assert rows["solved.ipynb"] == full, rows
    assert rows["blank.ipynb"] == {c: "0" for c in LAB03_COLUMNS}, rows
    assert rows["partly_wrong.ipynb"] == {**full, "pack": "0", "dequantize": "0", "full_pipeline": "0",
                                          "nf4_choice": "0", "why_error_grows": "0", "total": "7"}, rows
    assert rows["tampered.ipynb"] == {**full, "nf4_choice": "0", "total": "13"}, rows
    assert "restored" in graded["rows"][str(folder / "tampered.ipynb")]["reason"]
    feedback = graded["feedback"]
    wrong_text = feedback[feedback_name(str(folder / "partly_wrong.ipynb"))]
    assert "FAIL [1, 2, 3, 15, 0, 9] packs to bytes 0x12, 0x3F, 0x09" in wrong_text
    assert "hint: Element 2i goes to the high nibble" in wrong_text
    assert "4.1271 bits, 0.0271 over the budget" in wrong_text
    assert "Every weight gets a 4-bit code at any block size" in wrong_text
    assert "points over the bound" in feedback[feedback_name(str(folder / "tampered.ipynb"))]


@pytest.mark.slow
def test_a_lab04_class_gets_the_expected_totals(tmp_path):
    solution = _learner(SOLUTION04)
    folder = tmp_path / "class"
    folder.mkdir()
    nbformat.write(solution, folder / "solved.ipynb")
    nbformat.write(_learner(ROOT / "labs" / "lab04_merge_adapters.ipynb"), folder / "blank.ipynb")
    # Partly wrong: one question miscounted and a wrong reason for DARE's rescaling.
    lost = _answer_cell(solution, "LOST_QUESTIONS")
    wrong = _with_answer(solution, lost, "round(sum(sweep[CHOICE]) * N_EVAL)",
                         "round(sum(sweep[CHOICE]) * N_EVAL) + 1")
    wrong = _with_answer(wrong, _answer_cell(solution, "WHY_RESCALE"), 'WHY_RESCALE = "c"', 'WHY_RESCALE = "a"')
    nbformat.write(wrong, folder / "partly_wrong.ipynb")
    # Tampered: the table edited to make DARE look best, and the decision's check cell edited to pass.
    choice = _answer_cell(solution, "CHOICE")
    tampered = _with_answer(solution, choice, "CHOICE = max(sweep, key=lambda row: sum(sweep[row]))",
                            'sweep["dare", 0.5] = (1.0, 1.0)\nCHOICE = ("dare", 0.5)')
    _cell(tampered, _check_cell(solution, "checks.check_merge_choice(")).source = \
        "print('your merge choice: all 2 checks passed.')"
    nbformat.write(tampered, folder / "tampered.ipynb")

    graded = _grade_cli(tmp_path, "lab04", folder, jobs=2)
    rows = {Path(k).name: {c: r[c] for c in LAB04_COLUMNS} for k, r in graded["rows"].items()}
    full = dict(zip(LAB04_COLUMNS, ("2", "2", "2", "2", "2", "2", "1", "1", "1", "15")))
    assert rows["solved.ipynb"] == full, rows
    assert rows["blank.ipynb"] == {c: "0" for c in LAB04_COLUMNS}, rows
    assert rows["partly_wrong.ipynb"] == {**full, "merge_cost": "0", "why_rescale": "0", "total": "13"}, rows
    assert rows["tampered.ipynb"] == {**full, "merge_choice": "0", "total": "13"}, rows
    assert "restored" in graded["rows"][str(folder / "tampered.ipynb")]["reason"]
    tampered_text = graded["feedback"][feedback_name(str(folder / "tampered.ipynb"))]
    assert "FAIL merged again, it scores what your table says" in tampered_text
    assert "The merged ΔW is added into the dense base weights" in \
        graded["feedback"][feedback_name(str(folder / "partly_wrong.ipynb"))]
