#!/usr/bin/env python3
"""Draw the course's two schematic figures into ``docs/figures/`` (committed PNGs).

    PYTHONPATH=. python tools/figures.py            redraw both figures
    PYTHONPATH=. python tools/figures.py --out DIR  draw them into DIR instead

- ``lora_layer.png`` (lesson 02): the frozen weight ``W`` beside the adapter path
  ``x -> A -> B -> ·α/r``, added to ``Wx``; shapes and which parts train.
- ``ties_merge.png`` (lesson 08): TIES on three small task matrices, trim -> elect -> disjoint
  mean, every number computed by ``loracore.merge``'s own functions (``ties_steps``), so the
  figure cannot disagree with the library (``tests/test_figures.py`` checks it against
  ``loracore.merge.ties`` and PEFT's ``ties``).

The drawing is deterministic: fixed data, no dates, and the PNG's metadata holds only this
script's name and matplotlib's version (the test redraws the figures and compares bytes when its
matplotlib is the one that drew the committed files).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Polygon, Rectangle  # noqa: E402

from loracore import merge as M  # noqa: E402
from loracore.atomic import atomic_write_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"
DPI = 110
FONT = "DejaVu Sans"  # matplotlib's bundled font: the same glyphs on every machine

# Colours: the frozen part grey, the trained parts one warm colour, flows dark.
FROZEN, FROZEN_EDGE = "#d9d9d9", "#6e6e6e"
TRAIN, TRAIN_EDGE = "#fdd9a0", "#c46a00"
INK = "#222222"
STRUCK = "#b00000"


def metadata() -> dict[str, str | None]:
    """PNG text chunks: where the file comes from, and no timestamp or web address."""
    return {"Software": None, "Source": "tools/figures.py",
            "Comment": f"matplotlib {matplotlib.__version__}"}


def _save(fig, path: Path, **kw) -> None:
    """Write ``fig`` as a PNG through a temporary file and a rename (a redraw that fails half-way
    leaves the committed figure as it was), then close it."""
    try:
        atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, metadata=metadata(), **kw))
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- (a) the LoRA layer


def _factor(ax, x0: float, x1: float, y: float, half: tuple[float, float], name: str, shape: str,
            note: str) -> None:
    """One LoRA factor as a trapezoid from x0 to x1 centred on y, ``half`` its half-heights at
    the left and right ends (wide to narrow for A, narrow to wide for B), labelled inside and
    annotated below."""
    left, right = half
    ax.add_patch(Polygon([(x0, y - left), (x1, y - right), (x1, y + right), (x0, y + left)],
                         closed=True, facecolor=TRAIN, edgecolor=TRAIN_EDGE, lw=1.6))
    mid = (x0 + x1) / 2
    ax.text(mid, y + 0.08, name, ha="center", va="center", fontsize=15, color=INK)
    ax.text(mid, y - 0.35, shape, ha="center", va="center", fontsize=10)
    ax.text(mid, y - 1.15, note, ha="center", va="top", fontsize=9.5, color=TRAIN_EDGE)


def _box(ax, x, y, w, h, face, edge, text, size=12, weight="normal", style="round,pad=0.02,rounding_size=0.08"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, facecolor=face, edgecolor=edge, lw=1.6))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, weight=weight, color=INK)


def _arrow(ax, start, end, color=INK, lw=1.6, style="-|>", **kw):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=14, color=color, lw=lw,
                                 shrinkA=0, shrinkB=0, **kw))


def draw_lora_layer(path: Path) -> None:
    """The LoRA layer as a picture: ``h = W x + (α/r) · B A x``."""
    fig, ax = plt.subplots(figsize=(9.6, 4.6))
    ax.set_xlim(0, 12)
    ax.set_ylim(-0.55, 5.9)
    ax.axis("off")
    base_y, low_y = 4.25, 1.55  # centre lines of the frozen path and of the adapter path

    # input x
    _box(ax, 0.15, 2.55, 1.2, 0.9, "white", INK, "$x$\n$d_{in}$", size=12)
    # split to the two paths
    _arrow(ax, (1.35, 3.15), (2.55, base_y), style="-|>")
    _arrow(ax, (1.35, 2.85), (2.55, low_y), style="-|>")

    # frozen W
    _box(ax, 2.6, base_y - 0.75, 3.4, 1.5, FROZEN, FROZEN_EDGE,
         "$W$   ($d_{out} \\times d_{in}$)\npretrained, frozen:\nno gradient", size=12)

    # A: a trapezoid narrowing d_in -> r
    a_x0, a_x1 = 2.6, 4.05
    _factor(ax, a_x0, a_x1, low_y, (0.85, 0.3), "$A$", "$r \\times d_{in}$", "trained\nstarts random")

    # the narrow middle: r numbers per token
    _arrow(ax, (a_x1, low_y), (a_x1 + 0.55, low_y))
    ax.text(a_x1 + 0.27, low_y + 0.42, "$r$", ha="center", fontsize=12, color=INK)
    ax.text(a_x1 + 0.27, low_y - 0.62, "$r \\ll d$", ha="center", fontsize=9.5, color=INK)

    # B: a trapezoid widening r -> d_out
    b_x0, b_x1 = a_x1 + 0.55, a_x1 + 2.0
    _factor(ax, b_x0, b_x1, low_y, (0.3, 0.85), "$B$", "$d_{out} \\times r$", "trained\nstarts at 0")

    # scaling
    s_x = b_x1 + 0.35
    _arrow(ax, (b_x1, low_y), (s_x, low_y))
    _box(ax, s_x, low_y - 0.45, 1.25, 0.9, "white", INK, "$\\times\\,\\alpha/r$", size=13)
    ax.text(s_x + 0.62, low_y - 0.72, "scaling\n(fixed)", ha="center", va="top", fontsize=9.5, color=INK)

    # the sum
    plus = (9.05, 2.9)
    ax.add_patch(plt.Circle(plus, 0.33, facecolor="white", edgecolor=INK, lw=1.6))
    ax.text(*plus, "+", ha="center", va="center", fontsize=18, color=INK)
    _arrow(ax, (6.0, base_y), (plus[0] - 0.12, plus[1] + 0.31), connectionstyle="arc3,rad=-0.15")
    _arrow(ax, (s_x + 1.25, low_y), (plus[0] - 0.12, plus[1] - 0.31), connectionstyle="arc3,rad=0.15")
    ax.text(7.45, base_y + 0.12, "$Wx$", fontsize=12, color=INK)
    ax.text(8.45, 1.45, "$\\frac{\\alpha}{r}BAx$", fontsize=13, color=INK)

    # output
    _arrow(ax, (plus[0] + 0.33, plus[1]), (plus[0] + 0.95, plus[1]))
    _box(ax, 10.05, 2.45, 1.8, 0.9, "white", INK, "$h$\n$d_{out}$", size=12)

    ax.text(6.0, 5.6, "$h = Wx + \\frac{\\alpha}{r}\\,B A x$      ($\\Delta W = \\frac{\\alpha}{r} B A$ has rank $\\leq r$)",
            ha="center", va="center", fontsize=13.5, color=INK)
    # legend
    ly = -0.4
    ax.add_patch(Rectangle((0.2, ly), 0.35, 0.25, facecolor=FROZEN, edgecolor=FROZEN_EDGE))
    ax.text(0.65, ly + 0.125, "frozen", va="center", fontsize=10)
    ax.add_patch(Rectangle((1.75, ly), 0.35, 0.25, facecolor=TRAIN, edgecolor=TRAIN_EDGE))
    ax.text(2.2, ly + 0.125, "trained: $r\\,(d_{in} + d_{out})$ numbers instead of $d_{out}\\,d_{in}$;"
            "  B = 0 at the start, so the layer begins as the base layer", va="center", fontsize=10)
    _save(fig, path, bbox_inches="tight", pad_inches=0.08)


# --------------------------------------------------------------------------- (b) TIES, step by step

#: Three small task vectors (3 x 4 each), chosen to show each step: an entry where one large value
#: outweighs two smaller ones of the other sign (row 3, column 1: -0.4 - 0.5 + 1.0 elects +), an
#: entry that the trim removes in every task (row 3, column 4), one where the plain sum nearly
#: cancels (row 1, column 4), and no two magnitudes tied at the trim's threshold (so the kept set
#: does not depend on how ``topk`` breaks ties).
TASKS = (
    ((0.9, -0.2, 0.5, 0.1), (-0.7, 0.3, -0.1, 0.8), (-0.4, -0.6, 0.2, -0.3)),
    ((-0.4, 0.7, -0.3, 0.6), (0.5, -0.1, 0.9, -0.2), (-0.5, 0.2, -0.6, 0.05)),
    ((-0.3, 0.4, 0.1, -0.9), (-0.2, 0.6, 0.15, 0.7), (1.0, -0.1, -0.5, 0.25)),
)
DENSITY = 0.5  # keep the top half of each task's entries by magnitude (TIES' paper keeps 0.2)


@dataclass(frozen=True)
class TiesSteps:
    """Every intermediate of TIES on ``tasks`` (n tasks of shape S), from ``loracore.merge``."""

    tasks: torch.Tensor      # (n, *S) the task vectors
    trimmed: torch.Tensor    # (n, *S) after magnitude_prune_tensor (trim)
    mass: torch.Tensor       # (*S) the trimmed tasks' sum, whose sign is elected ("total")
    agrees: torch.Tensor     # (n, *S) bool: a kept entry with the elected sign
    merged: torch.Tensor     # (*S) disjoint_merge: the mean over agreeing entries
    plain_sum: torch.Tensor  # (*S) task_arithmetic of the untrimmed tasks, for comparison


def ties_steps(tasks=TASKS, density: float = DENSITY) -> TiesSteps:
    """TIES with weights 1, one step at a time, by ``loracore.merge``'s building blocks."""
    stacked = torch.tensor(tasks, dtype=torch.float32)
    trimmed = torch.stack([M.prune(t, density, "magnitude") for t in stacked])
    agrees = M.calculate_majority_sign_mask(trimmed, "total")
    merged = M.disjoint_merge(trimmed, agrees)
    weights = torch.ones(len(stacked))
    return TiesSteps(stacked, trimmed, trimmed.sum(dim=0), agrees, merged,
                     M.task_arithmetic(list(stacked), weights))


def _fmt(v: float) -> str:
    """A cell's number: at most two decimals, no trailing zeros, no '-0'."""
    v = round(float(v), 2)
    if v == 0:
        return "0"
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _matrix(ax, values, title, *, colors, struck=None, text_colors=None, size=12):
    """Draw one small matrix as a grid of coloured, numbered cells; ``struck`` cells get a
    diagonal line (a value that does not count)."""
    rows, cols = len(values), len(values[0])
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_aspect("equal")
    ax.axis("off")
    for i in range(rows):
        for j in range(cols):
            ax.add_patch(Rectangle((j, i), 1, 1, facecolor=colors[i][j], edgecolor="white", lw=1.5))
            if struck and struck[i][j]:
                ax.plot([j + 0.12, j + 0.88], [i + 0.82, i + 0.18], color=STRUCK, lw=1.6)
            ax.text(j + 0.5, i + 0.5, values[i][j], ha="center", va="center", fontsize=size,
                    color=text_colors[i][j] if text_colors else INK)
    ax.set_title(title, fontsize=11, pad=5, color=INK)


def _shade(v: float, vmax: float = 1.0) -> str:
    """Blue for positive, red for negative, paler for smaller magnitudes (a diverging map)."""
    cmap = plt.get_cmap("RdBu")
    return matplotlib.colors.to_hex(cmap(0.5 + 0.42 * max(-1.0, min(1.0, float(v) / vmax))))


def draw_ties(path: Path, steps: TiesSteps | None = None) -> None:
    """Three task matrices -> trim -> elect sign -> disjoint mean, with the numbers in the cells."""
    s = ties_steps() if steps is None else steps
    n = s.tasks.shape[0]
    fig = plt.figure(figsize=(13.0, 7.4))
    grid = fig.add_gridspec(n, 4, wspace=0.32, hspace=0.42, left=0.015, right=0.985, top=0.84, bottom=0.09)
    keep = int(DENSITY * s.tasks[0].numel())
    elected = torch.where(s.mass >= 0, 1.0, -1.0)
    for k in range(n):
        t = s.tasks[k].tolist()
        _matrix(fig.add_subplot(grid[k, 0]), [[_fmt(v) for v in row] for row in t], f"task vector $\\tau_{k + 1}$",
                colors=[[_shade(v) for v in row] for row in t])
        kept, agrees = (s.trimmed[k] != 0).tolist(), s.agrees[k].tolist()
        labels = [[_fmt(v) if kept[i][j] else "·" for j, v in enumerate(row)] for i, row in enumerate(t)]
        colors = [[(_shade(v) if agrees[i][j] else "#fbe3e3") if kept[i][j] else "#f2f2f2"
                   for j, v in enumerate(row)] for i, row in enumerate(t)]
        text = [[(INK if agrees[i][j] else STRUCK) if kept[i][j] else "#9a9a9a"
                 for j in range(len(row))] for i, row in enumerate(t)]
        # kept by the trim but against the elected sign: struck out, left out of the mean
        struck = [[kept[i][j] and not agrees[i][j] for j in range(len(row))] for i, row in enumerate(t)]
        _matrix(fig.add_subplot(grid[k, 1]), labels, f"trimmed $\\tau_{k + 1}$: top {keep} of {len(t) * len(t[0])}",
                colors=colors, struck=struck, text_colors=text)

    mass = s.mass.tolist()
    _matrix(fig.add_subplot(grid[0, 2]), [[_fmt(v) for v in row] for row in mass],
            "mass: sum of the trimmed $\\tau$s", colors=[[_shade(v, 1.5) for v in row] for row in mass])
    signs = [["+" if e > 0 else "−" for e in row] for row in elected.tolist()]
    _matrix(fig.add_subplot(grid[1, 2]), signs, "elected sign = sign(mass)",
            colors=[[_shade(0.6 * e) for e in row] for row in elected.tolist()], size=16)
    counts = s.agrees.sum(dim=0).tolist()
    _matrix(fig.add_subplot(grid[2, 2]), [[str(c) for c in row] for row in counts],
            "how many tasks agree", colors=[["#f2f2f2"] * len(row) for row in counts])
    merged = s.merged.tolist()
    _matrix(fig.add_subplot(grid[1, 3]), [[_fmt(v) for v in row] for row in merged],
            "TIES result: mean of the\nagreeing entries (disjoint mean)",
            colors=[[_shade(v) for v in row] for row in merged])
    plain = s.plain_sum.tolist()
    _matrix(fig.add_subplot(grid[2, 3]), [[_fmt(v) for v in row] for row in plain],
            "for comparison: the plain sum\n$\\tau_1+\\tau_2+\\tau_3$ (task arithmetic)",
            colors=[[_shade(v) for v in row] for row in plain])

    heads = [(0.125, "1. three task vectors"),
             (0.375, f"2. trim: keep each one's\n{DENSITY:.0%} largest |values|"),
             (0.625, "3. elect a sign per entry:\nthe sign of the summed mass"),
             (0.875, "4. disjoint mean: average\nonly entries of that sign")]
    for x, text in heads:
        fig.text(x, 0.945, text, ha="center", va="center", fontsize=12.5, weight="bold", color=INK)
    for x in (0.25, 0.5, 0.75):
        fig.text(x, 0.945, "→", ha="center", va="center", fontsize=22, color=INK)
    fig.text(0.5, 0.03, "blue: positive, red: negative     ·  trimmed away     "
             "struck out: kept by the trim but against the elected sign, so not averaged     "
             f"(loracore.merge, density {DENSITY})", ha="center", fontsize=10.5, color=INK)
    _save(fig, path)


FIGURE_FILES = {"lora_layer.png": draw_lora_layer, "ties_merge.png": draw_ties}


def draw_all(out: Path = FIGURES) -> list[Path]:
    """Draw every figure into ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with plt.rc_context({"font.family": FONT}):  # the caller's matplotlib settings stay as they were
        for name, draw in FIGURE_FILES.items():
            draw(out / name)
            paths.append(out / name)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIGURES, help="folder to write into (default: docs/figures)")
    args = parser.parse_args()
    for path in draw_all(args.out):
        print(path)


if __name__ == "__main__":
    main()
