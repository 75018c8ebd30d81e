"""Prose that cannot drift from data: every measured number a lesson states is in its stored outputs.

A notebook's Markdown says what the experiment showed ("88% held out", "a held-out loss of
0.058", "526 ms per batch"); its stored outputs are the evidence. When a notebook is re-run and
the numbers move, a sentence that still quotes the old run is a false statement. This test
reads every Markdown cell of every notebook in ``lessons/`` and ``solutions/`` (labs are
generated from solutions) and fails on a measured number that no stored output of the same
notebook shows.

**Which numbers are checked** (a *measured-looking* number), outside code spans, fenced code,
headings and link targets:

- a percentage: ``88%``, ``12.5 %``;
- a number with a decimal point or an exponent: ``0.258``, ``5.05``, ``8.2e-04``;
- a number with a thousands separator: ``155,520``;
- an integer followed by a unit of size, time or speed: ``108 GB``, ``526 ms``, ``17 s``,
  ``2 minutes``, ``27 tokens/s``, ``3x``/``3×``.

Plain integers without a unit are not checked: they are counts the data define (24 capitals,
8 questions, 40 records), settings (r = 16, α = 32, 90 steps), shapes (576, 896→128), section,
lesson and exercise numbers, years.

**Exempt numbers** (the convention is small on purpose):

1. *Quoted with its source*: a sentence whose parentheses name a year, e.g. "(Dettmers et al.
   2023)" or "(Hu et al. 2021, Table 6)", quotes its numbers from that source.
2. *Quoted, paragraph-wide*: a paragraph (a block between blank lines) containing the HTML
   comment ``<!-- quoted -->`` (invisible when rendered) quotes figures from elsewhere: a paper
   named without a year, another machine's run, a benchmark file. The prose itself must say where
   they come from.
3. *Settings*: a number equal to a numeric literal of the notebook's own code cells (a learning
   rate ``2e-3``, a density ``0.2``, a clipping norm ``1.0``) is an input, not a measurement.
4. *Arithmetic shown in the text*: the numbers of a clause (between ``,``/``;``/``:`` and the
   sentence's ends) that writes out a calculation, i.e. has ``=`` or ``≈`` and an operator between
   two numbers: "8/64 + 32/(64·256) = 0.125 + 0.002 = 0.127 bits", "1/7 ≈ 0.14".
5. *The size of one question*: "12.5 points", "2.5 points", a number of points equal to 100/n for
   a whole n (one question of an n-question set).
6. *Names*: a number glued to a word by a hyphen, as in a model's name (Qwen2-0.5B, SmolLM2-135M).
7. *A device's capacity*: a size followed by "GPU(s)" ("one 80 GB GPU", "two 24 GB GPUs").

**Matching rule.** Thousands separators are ignored (``1,104`` is ``1104``), and so is the sign;
a decimal with a ``k``/``M``/``B`` suffix is scaled (``4.9M`` is 4.9 million, matching 4,884,480).
A prose number written with *d* decimals (for ``8.2e-04``: the mantissa's decimals, at its
exponent) matches an output number that rounds to it at that precision, i.e. lies within half a
unit of its last digit: "0.058" matches 0.0581 and 0.058, "88%" matches 87.5 and 0.875 (a
percentage also matches the fraction printed by the output, times 100). Outputs are the
``text/plain``, ``text/markdown`` and stream outputs of the notebook's code cells (so a number a
cell renders from variables counts). Arithmetic written in the prose ("8/64 = 0.125") must appear
in the outputs too, or be written out (rule 4), or be removed.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import nb as nbtools  # noqa: E402

NOTEBOOKS = [p for p in nbtools.all_notebooks() if p.parent.name in ("lessons", "solutions")]
IDS = [f"{p.parent.name}/{p.name}" for p in NOTEBOOKS]

QUOTED = "<!-- quoted -->"
_FENCE = re.compile(r"^\s*(```|~~~).*?^\s*\1[^\n]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_MATH = re.compile(r"\$[^$\n]+\$")
_LINK_TARGET = re.compile(r"\]\([^)]*\)")
_HTML = re.compile(r"<[^>]+>")
_HEADING = re.compile(r"^ {0,3}#{1,6}\s.*$", re.MULTILINE)
#: A parenthesis that names a year: the source the sentence quotes.
_CITATION = re.compile(r"\([^()]*\b(?:19|20)\d\d[a-z]?\b[^()]*\)")
#: Sentence ends: ". " or "; " before a capital, a digit or markup (not "et al. 2023").
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z*(\[])")
_NUMBER = re.compile(
    r"(?<![\w.,/])(?<!\w-)(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:[eE][-+−]?\d+)?)"
    r"(?P<mult>[kMB](?![\w-]))?"
    r"(?P<after>\s?%|\s?(?:GB|GiB|MB|MiB|KB|KiB|kB|TB|ms|µs|s|sec|seconds?|min|minutes?|hours?|h|"
    r"tokens/s|×|x)(?![\w]))?"
)
#: A clause that writes out arithmetic: ``=`` or ``≈`` and an operator between two numbers.
_CLAUSE_END = re.compile(r"[,;:](?=\s)")
_OPERATOR = re.compile(r"[\d)½]\s*(?:[A-Za-z]+\s*)?[+\-−·×*/÷]\s*[\d(½]")
_POINTS = re.compile(r"\s+points\b")
_DEVICE = re.compile(r"\s*GPUs?\b")
_MULTIPLIER = {"k": 1e3, "M": 1e6, "B": 1e9}
_OUT_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d*\.?\d+(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class Claim:
    """One measured-looking number in the prose: its text, value and precision."""

    text: str
    value: float
    half_unit: float  # half a unit of the last written digit: the rounding tolerance
    percent: bool
    sentence: str


def _parse(num: str) -> tuple[float, float]:
    """``num`` as written -> (value, half a unit of its last digit)."""
    num = num.replace(",", "").replace("−", "-")
    mantissa, _, exponent = num.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    scale = 10.0 ** int(exponent) if exponent else 1.0
    return float(mantissa) * scale, 0.5 * 10.0 ** -decimals * scale


def _whole(x: float) -> bool:
    return abs(x - round(x)) < 1e-9


def _prose(markdown: str) -> str:
    """``markdown`` without code, math, headings and link targets (numbers there are not claims)."""
    for pattern in (_FENCE, _CODE_SPAN, _MATH, _LINK_TARGET, _HEADING):
        markdown = pattern.sub(" ", markdown)
    return markdown


def claims(markdown: str) -> list[Claim]:
    """The measured-looking numbers of one Markdown cell, less the exempt ones (rules 1 and 2)."""
    found = []
    for paragraph in re.split(r"\n\s*\n", markdown):
        if QUOTED in paragraph:
            continue
        text = _HTML.sub(" ", _prose(paragraph))
        for sentence in _SENTENCE_END.split(text):
            if _CITATION.search(sentence):
                continue
            for clause in _CLAUSE_END.split(sentence.replace("**", "")):
                if re.search(r"[=≈]", clause) and _OPERATOR.search(clause):
                    continue  # rule 4
                for m in _NUMBER.finditer(clause):
                    num, after = m.group("num"), m.group("after")
                    decimal = "." in num or "e" in num.lower() or "," in num
                    if not decimal and not after:
                        continue
                    value, half = _parse(num)
                    if m.group("mult"):
                        scale = _MULTIPLIER[m.group("mult")]
                        value, half = value * scale, half * scale
                    if after and _DEVICE.match(clause, m.end()):
                        continue  # rule 7
                    if _POINTS.match(clause, m.end()) and value > 0 and _whole(100 / value):
                        continue  # rule 5
                    found.append(Claim(m.group(0).strip(), value, half, bool(after) and "%" in after,
                                       " ".join(sentence.split())))
    return found


def output_numbers(texts: list[str]) -> list[float]:
    """Every number printed in ``texts`` (stored outputs), separators removed."""
    return [float(m.group(0).replace(",", "")) for t in texts for m in _OUT_NUMBER.finditer(t)]


def _outputs(nb) -> list[str]:
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                texts.append(out["text"])
            for mime in ("text/plain", "text/markdown"):
                if mime in out.get("data", {}):
                    value = out["data"][mime]
                    texts.append(value if isinstance(value, str) else "".join(value))
    return texts


def _code_literals(nb) -> set[float]:
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    return {float(m.group(0)) for m in re.finditer(r"(?<![\w.])\d*\.?\d+(?:[eE][-+]?\d+)?", code)}


def supported(claim: Claim, values: list[float], settings: set[float] = frozenset()) -> bool:
    """Whether an output number rounds to ``claim`` (or it is a setting of the code, rule 3)."""
    if any(math.isclose(claim.value, s, rel_tol=1e-9) for s in settings):
        return True
    tolerance = claim.half_unit * (1 + 1e-9) + 1e-12
    for v in values:
        if abs(v - claim.value) <= tolerance:
            return True
        if claim.percent and abs(100 * v - claim.value) <= tolerance:
            return True
    return False


def unsupported(path: Path) -> list[str]:
    """One line per measured-looking number of ``path``'s prose that its outputs do not show."""
    nb = nbformat.read(path, as_version=4)
    values, settings = output_numbers(_outputs(nb)), _code_literals(nb)
    return [f"cell {i}: {c.text!r} in “{c.sentence[:160]}”"
            for i, cell in enumerate(nb.cells) if cell.cell_type == "markdown"
            for c in claims(cell.source) if not supported(c, values, settings)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_every_measured_number_in_the_prose_is_in_the_stored_outputs(path):
    name = f"{path.parent.name}/{path.name}"
    problems = unsupported(path)
    assert not problems, (
        f"{name}: numbers in the prose that no stored output shows (change the prose to what the "
        "outputs say, or mark a quoted figure: see this test's docstring):\n  " + "\n  ".join(problems))


OUTPUT = ("r=16: 7/8 right (0.875), held-out loss 0.0581, 1104.2 GB, step 1.504 s, 155520 params, "
          "4,884,480 trainable")


@pytest.mark.parametrize("markdown, flagged", [
    # measured numbers that the output shows, in other formats or rounded
    ("Rank 16 reached 88% held out.", []),
    ("The held-out loss fell to 0.058.", []),
    ("It needs 1,104 GB, or 1104.2 GB exactly.", []),
    ("One step took 1.50 s, for 155,520 more numbers.", []),
    # drifted numbers: the sentence still quotes an older run
    ("Rank 16 reached 100% held out.", ["100%"]),
    ("The held-out loss fell to 0.060.", ["0.060"]),
    ("It needs 980 GB.", ["980 GB"]),
    ("One step took 1.2 s.", ["1.2 s"]),
    ("Rank 16 reached 88%, rank 64 reached 62%.", ["62%"]),
    # exempt: quoted with a source in the same sentence, or a paragraph marked as quoted
    ("Perplexity was 27.41 with NF4 (Dettmers et al. 2023, Table 2).", []),
    ("On GPT-3 ranks as low as 1 to 4 were enough (Hu et al. 2021). It scored 71%.", ["71%"]),
    ("<!-- quoted -->\nOn one H100 the run took 17 s.\n\nHere it took 19 s.", ["19 s"]),
    # exempt: not measurements
    ("## 3. Rank 64 and 0.5", []),
    ("We train r = 16, α = 32 on 24 capitals with 8 held out, in 2023; hidden 576, 896→128.", []),
    ("The call `train(lr=2e-4, steps=0.75)` is code.", []),
    ("A learning rate of 2e-3 (a setting of the code).", []),
    ("Per weight: 8/64 + 32/(64·256) = 0.125 + 0.002 = **0.127 bits** instead of 0.5.", []),
    ("The step becomes 1/7 ≈ 0.14, and the loss became 0.14.", ["0.14"]),
    ("One question is 12.5 points; the seeds differ by 7.5 points.", ["7.5"]),
    ("SmolLM2-135M and Qwen2-0.5B scored 0.5 and 0.6.", ["0.5", "0.6"]),
    ("It all-reduces 4.9M numbers, not 5.2M, of a 7B model.", ["5.2M"]),
    ("It fits one 80 GB GPU, or two 24 GB GPUs with 40 GB each.", ["40 GB"]),
])
def test_the_scan_flags_drifted_numbers_and_only_them(markdown, flagged):
    values = output_numbers([OUTPUT])
    settings = {2e-3}
    assert [c.text for c in claims(markdown) if not supported(c, values, settings)] == flagged
