"""Gradebooks a learning platform imports: Canvas's and Gradescope's CSV layouts, from a roster.

Learners are known to ``loracore grade`` by their submission files; the platforms know them by
their own identities. The instructor exports the class list from the platform (the *roster*) and
names each submission after one column of it (the *key*): ``jdoe@uni.edu.ipynb`` for an e-mail
address, ``1234567.ipynb`` for an SIS id. :func:`match_roster` joins the two on the file name
without ``.ipynb`` (compared without case or surrounding spaces) and refuses, before any
grading, a submission without a roster row, two submissions for one learner and two roster rows
with one key; a roster row without a submission is *missing*: listed, and its score left blank
(the platform keeps what it had; Canvas then applies its own missing-submission policy) or
written as 0 with ``missing="zero"``.

Canvas (:func:`canvas_rows`): the layout of Canvas's own gradebook export, which its gradebook
import reads back. Header ``Student, ID, SIS User ID, SIS Login ID, Section``, then one column
per assignment named ``Title (assignment id)``; the second row is ``    Points Possible`` (four
spaces, as Canvas writes it) with each assignment's points; then one row per student, the name
written "Last, First". Where this is documented: Canvas's exporter (instructure/canvas-lms,
``Course#gradebook_to_csv`` in ``app/models/course.rb``: the header, the ``Points Possible``
row, ``title_with_id`` columns) and the import guides built on it (Ohio State's teaching
resources, "Import a CSV File to Carmen Grades", Carmen being their Canvas: one of Student / ID
/ SIS User ID identifies the student, plus SIS Login ID and Section, plus one column per
assignment; a new assignment column creates a new assignment; a score already there is
overwritten; Canvas's own guide to the gradebook export: read-only columns are ignored on
re-import). So the lab is *one* assignment column (the
total): per-exercise columns would make one Canvas assignment each. Name the column as it
appears in your own Canvas export (``--assignment "Lab 01 (123456)"``) so the import finds the
assignment instead of creating one. The roster is that same export (its ``Points Possible`` row
and rows without the key are skipped).

Gradescope (:func:`gradescope_rows`): ``First Name, Last Name, SID, Email, Total Score``, one
row per student. Gradescope identifies a student by e-mail (unique per course member) or SID,
its roster guide says (Gradescope guides, "Adding Students and Staff": columns with headers,
unique e-mail addresses, names full or split in first and last, UTF-8 for accented characters);
the names of the columns are those of Gradescope's own grade export (``First Name, Last Name,
SID, Email, Sections, Total Score, Max Points, Status, ...``, guide "Exporting Grades,
Evaluations, and Submissions", as public code that reads that export spells them). The page documenting the scores-upload CSV
itself was not in the references this was built from: check one upload by hand before relying
on it. The roster is Gradescope's roster export (``First Name, Last Name, SID, Email, Role``).

Both: UTF-8 without a byte-order mark (a BOM would become part of the first header), commas and
quotes in names quoted as RFC 4180 says (Python's ``csv``), points as plain decimals (``7.5``,
``10``: never ``1e+03``, never a comma for the decimal point).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from loracore.atomic import atomic_write_text
from loracore.grade.labs import Lab
from loracore.grade.verdicts import Result

CANVAS_IDENTITY = ["Student", "ID", "SIS User ID", "SIS Login ID", "Section"]
CANVAS_POINTS_ROW = "    Points Possible"
GRADESCOPE_COLUMNS = ["First Name", "Last Name", "SID", "Email", "Total Score"]

#: Roster columns tried, in order, when no key column is named.
KEY_CANDIDATES = ["SIS Login ID", "Email", "SIS User ID", "SID", "ID"]


def points_text(points: float) -> str:
    """Points as both platforms read them: a plain decimal, at most 4 places, no exponent.

    >>> [points_text(p) for p in (10.0, 7.5, 0.0, 1234567.0, 1 / 3)]
    ['10', '7.5', '0', '1234567', '0.3333']
    """
    text = f"{round(float(points), 4):.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


@dataclass
class Roster:
    """A platform's class list: its columns, its rows, and the column that names submissions."""

    path: Path
    columns: list[str]
    rows: list[dict[str, str]]
    key: str

    def key_of(self, row: dict[str, str]) -> str:
        return _norm(row.get(self.key, ""))


def _norm(text: str) -> str:
    return text.strip().casefold()


def read_roster(path: Path, key: str | None = None) -> Roster:
    """Read a roster CSV exported from Canvas or Gradescope (UTF-8, a BOM allowed).

    ``key`` is the column whose values name the submissions (default: the first of
    :data:`KEY_CANDIDATES` the roster has). Canvas's ``Points Possible`` row and rows with an
    empty key are skipped. Raises ``ValueError`` naming the file for a roster without that
    column, without rows, or with one key on two rows.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"loracore grade: the roster {path} is not UTF-8 text ({exc.reason}); "
                         f"save it as CSV UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [c.strip() for c in reader.fieldnames or []]
    if not columns:
        raise ValueError(f"loracore grade: the roster {path} is empty (a CSV with a header row "
                         f"is expected)")
    if key is None:
        key = next((c for c in KEY_CANDIDATES if c in columns), None)
        if key is None:
            raise ValueError(f"loracore grade: the roster {path} has none of the columns "
                             f"{KEY_CANDIDATES} to name submissions by; name one with "
                             f"--roster-key (its columns: {columns})")
    elif key not in columns:
        raise ValueError(f"loracore grade: the roster {path} has no column {key!r} "
                         f"(its columns: {columns})")
    rows = []
    for raw in reader:
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if isinstance(v, str)}
        if row.get("Student", "").strip() == CANVAS_POINTS_ROW.strip() or not _norm(row.get(key, "")):
            continue
        rows.append(row)
    if not rows:
        raise ValueError(f"loracore grade: the roster {path} has no row with a {key!r}")
    roster = Roster(Path(path), columns, rows, key)
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        k = roster.key_of(row)
        if k in seen:
            raise ValueError(f"loracore grade: the roster {path} has {key!r} = {row[key]!r} on two "
                             f"rows: one submission cannot be given to both")
        seen[k] = i
    return roster


@dataclass
class Matched:
    """Submissions joined with roster rows: ``rows[i]`` is the roster row of ``submissions[i]``."""

    roster: Roster
    by_submission: dict[str, dict[str, str]]
    missing: list[dict[str, str]] = field(default_factory=list)  # roster rows without a submission


def submission_key(path: str) -> str:
    """The name a submission gives its learner: the file's name without ``.ipynb``."""
    name = Path(path).name
    return _norm(name[: -len(".ipynb")] if name.lower().endswith(".ipynb") else name)


def match_roster(roster: Roster, submissions: list[str]) -> Matched:
    """Join each submission to its roster row; raise ``ValueError`` listing every mismatch.

    Refused: a submission whose name is no roster key, two submissions with one name. Allowed
    and listed in ``missing``: roster rows that no submission names.
    """
    index = {roster.key_of(row): row for row in roster.rows}
    unknown = [s for s in submissions if submission_key(s) not in index]
    by_key: dict[str, list[str]] = {}
    for s in submissions:
        by_key.setdefault(submission_key(s), []).append(s)
    twice = {k: v for k, v in by_key.items() if len(v) > 1}
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} submission(s) whose file name is no {roster.key!r} of "
                        f"the roster {roster.path}: " + ", ".join(unknown))
    if twice:
        problems.append("two or more submissions for one learner: " + "; ".join(
            " and ".join(v) for v in twice.values()))
    if problems:
        raise ValueError("loracore grade: " + ". ".join(problems) + f". Name each notebook after "
                         f"its learner's {roster.key!r} (e.g. {roster.rows[0][roster.key]}.ipynb)")
    return Matched(roster, {s: index[submission_key(s)] for s in submissions},
                   [row for k, row in index.items() if k not in by_key])


#: The roster columns each platform matches students by (at least one must be there).
IDENTITIES = {"canvas": ["ID", "SIS User ID", "SIS Login ID"], "gradescope": ["Email", "SID"]}


def check_roster_for(roster: Roster, platform: str) -> None:
    """Raise ``ValueError`` unless ``roster`` has a column that ``platform`` matches students by."""
    wanted = IDENTITIES[platform]
    if not any(c in roster.columns for c in wanted):
        raise ValueError(f"loracore grade: the roster {roster.path} has none of the columns "
                         f"{platform.capitalize()} matches students by ({', '.join(wanted)}); "
                         f"its columns: {roster.columns}")


def _by_row(results: list[Result], matched: Matched) -> dict[int, Result]:
    """Each result under its roster row (by identity): a result of no matched submission is refused."""
    stray = [r.submission for r in results if r.submission not in matched.by_submission]
    if stray:
        raise ValueError(f"loracore grade: results for submissions the roster was not matched with: "
                         f"{stray}")
    return {id(matched.by_submission[r.submission]): r for r in results}


def _score(result: Result | None, missing: str) -> str:
    if result is None:
        return "0" if missing == "zero" else ""
    return points_text(result.total())


def _check_missing(missing: str) -> None:
    if missing not in ("blank", "zero"):
        raise ValueError(f"loracore grade: --missing must be 'blank' or 'zero', got {missing!r}")


def canvas_rows(lab: Lab, results: list[Result], matched: Matched, assignment: str,
                missing: str = "blank") -> list[list[str]]:
    """Canvas's gradebook layout: header, the ``Points Possible`` row, one row per roster student.

    Students come in the roster's order; one without a submission gets a blank score (or 0).
    """
    _check_missing(missing)
    check_roster_for(matched.roster, "canvas")
    if not assignment.strip():
        raise ValueError("loracore grade: the Canvas assignment column needs a name")
    by_row = _by_row(results, matched)
    rows = [[*CANVAS_IDENTITY, assignment],
            [CANVAS_POINTS_ROW, "", "", "", "", points_text(lab.max_points)]]
    for row in matched.roster.rows:
        rows.append([row.get(c, "") for c in CANVAS_IDENTITY] + [_score(by_row.get(id(row)), missing)])
    return rows


def _split_name(row: dict[str, str]) -> tuple[str, str]:
    if row.get("First Name") or row.get("Last Name"):
        return row.get("First Name", ""), row.get("Last Name", "")
    full = row.get("Name") or row.get("Student") or ""
    if "," in full:  # Canvas writes "Last, First"
        last, first = (p.strip() for p in full.split(",", 1))
        return first, last
    return full, ""


def gradescope_rows(lab: Lab, results: list[Result], matched: Matched,
                    missing: str = "blank") -> list[list[str]]:
    """Gradescope's layout: header, one row per roster student (names, SID, e-mail, total)."""
    _check_missing(missing)
    check_roster_for(matched.roster, "gradescope")
    by_row = _by_row(results, matched)
    rows = [list(GRADESCOPE_COLUMNS)]
    for row in matched.roster.rows:
        first, last = _split_name(row)
        rows.append([first, last, row.get("SID", ""), row.get("Email", ""),
                     _score(by_row.get(id(row)), missing)])
    return rows


def write_rows(path: Path, rows: list[list[str]]) -> None:
    """Write ``rows`` as a UTF-8 CSV file (no BOM, ``\\r\\n`` line ends as RFC 4180), atomically."""
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows(rows)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), buffer.getvalue())
