"""The course's pages point at what exists.

- Every relative link in README.md and docs/*.md (inline ``[text](target)`` or a reference
  definition ``[id]: target``) names a file of the repository, and an ``#anchor`` into a Markdown
  file names one of its headings, spelled as GitHub spells heading anchors.
- Lesson 00's roadmap links every lesson and every lab, in the order of the README's course table,
  and its links resolve too.
- The glossary says where each term is taught, so every lesson and lab is linked from it.
- Every lesson states what the learner will be able to do right after its introduction (3 to 5
  "By the end of this lesson you can" bullets) and ends with 3 to 6 takeaways.
- Every relative link and image in the Markdown of every lesson, lab and solution notebook
  resolves (JupyterLab renders ``![alt](../docs/figures/x.png)`` from the notebook's folder), and
  every image has alt text.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COURSE = sorted((ROOT / "lessons").glob("*.ipynb")) + sorted((ROOT / "labs").glob("*.ipynb"))
NOTEBOOKS = COURSE + sorted((ROOT / "solutions").glob("*.ipynb"))
TOUR = ROOT / "lessons" / "00_tour.ipynb"

_FENCE = re.compile(r"^\s*(```|~~~).*?^\s*\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_INLINE = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_IMAGE = re.compile(r"!\[([^\]]*)\]\(")


def _prose(text: str) -> str:
    """``text`` without code blocks and code spans, which hold examples, not links."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    """Every link target in Markdown ``text``, inline or reference-style, in order of appearance.

    >>> links("see [a](x.md#b) and [c][1]\\n\\n[1]: ../y.ipynb")
    ['x.md#b', '../y.ipynb']
    """
    prose = _prose(text)
    found = [(m.start(), m.group(1)) for m in _INLINE.finditer(prose)]
    found += [(m.start(), m.group(1)) for m in _REFERENCE.finditer(prose)]
    return [target for _, target in sorted(found)]


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of Markdown ``text`` (and explicit ``<a id=...>``):
    lower case, punctuation dropped, spaces as hyphens, ``-1``, ``-2``... on repeats.

    >>> sorted(anchors("## Where next\\n## llama.cpp and Ollama\\n## Δ, α\\n## Where next"))
    ['llamacpp-and-ollama', 'where-next', 'where-next-1', 'δ-α']
    """
    seen: dict[str, int] = {}
    result = set(_HTML_ANCHOR.findall(text))
    for heading in _HEADING.findall(_FENCE.sub("", text)):
        plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", plain.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        result.add(slug if n == 0 else f"{slug}-{n}")
    return result


def broken_links(text: str, folder: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with the relative links of Markdown ``text`` that lives in ``folder``: one
    line per link naming a missing file, a path outside ``root``, or a missing heading anchor."""
    problems = []
    for target in links(text):
        if _SCHEME.match(target):  # http:, mailto: ... are not files of the course
            continue
        path_part, _, anchor = unquote(target).partition("#")
        path = (folder / path_part).resolve() if path_part else None
        if path is not None:
            if not path.is_relative_to(root.resolve()):
                problems.append(f"{target}: outside the repository")
                continue
            if not path.exists():
                problems.append(f"{target}: no such file")
                continue
        if anchor and (path is None or path.suffix == ".md"):
            heading_text = text if path is None else path.read_text(encoding="utf-8")
            if anchor not in anchors(heading_text):
                problems.append(f"{target}: no heading with anchor #{anchor}")
    return problems


def _markdown_of(notebook: Path) -> str:
    nb = nbformat.read(notebook, as_version=4)
    return "\n\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def _course_files(targets: list[str], folder: Path) -> list[Path]:
    """The lessons and labs among ``targets`` (resolved from ``folder``), first mention only."""
    wanted = {p.resolve() for p in COURSE}
    order: list[Path] = []
    for target in targets:
        path = (folder / unquote(target).partition("#")[0]).resolve()
        if path in wanted and path not in order:
            order.append(path)
    return order


# --------------------------------------------------------------------------- the checker itself


def test_the_checker_finds_a_missing_file_a_missing_anchor_and_a_path_outside(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Title\n\n## A section\n")
    page = ("[ok](other.md#a-section) [gone](missing.md) [bad anchor](other.md#nowhere)\n"
            "[out](../../elsewhere.md) [web](https://example.org/x) [self](#here)\n"
            "```\n[in a code block](not-checked.md)\n```\n\n## Here\n\n[ref]: ./other.md#title\n")
    problems = broken_links(page, tmp_path / "docs", root=tmp_path)
    assert problems == ["missing.md: no such file",
                        "other.md#nowhere: no heading with anchor #nowhere",
                        "../../elsewhere.md: outside the repository"], problems
    assert broken_links("[fine](other.md) [also][r]\n\n[r]: other.md#a-section\n",
                        tmp_path / "docs", root=tmp_path) == []


def test_the_checker_finds_a_missing_image_and_one_without_alt_text(tmp_path):
    (tmp_path / "docs" / "figures").mkdir(parents=True)
    (tmp_path / "docs" / "figures" / "f.png").write_bytes(b"\x89PNG")
    (tmp_path / "lessons").mkdir()
    page = "![a drawn figure](../docs/figures/f.png) ![](../docs/figures/gone.png)"
    assert broken_links(page, tmp_path / "lessons", root=tmp_path) == [
        "../docs/figures/gone.png: no such file"]
    assert images_without_alt_text(page) == 1
    assert images_without_alt_text("![a drawn figure](x.png)") == 0


# --------------------------------------------------------------------------- the pages


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_of_the_page_resolves(page):
    problems = broken_links(page.read_text(encoding="utf-8"), page.parent)
    assert not problems, f"{page.relative_to(ROOT)} has broken links:\n" + "\n".join(problems)


def test_the_course_pages_exist_and_the_readme_links_them():
    readme_targets = links((ROOT / "README.md").read_text(encoding="utf-8"))
    for page in ("docs/GLOSSARY.md", "docs/WHERE_NEXT.md"):
        assert (ROOT / page).is_file(), f"{page} is missing"
        assert page in readme_targets, f"README.md does not link {page}"


def images_without_alt_text(text: str) -> int:
    """How many Markdown images in ``text`` have empty alt text.

    >>> images_without_alt_text("![a figure](x.png) ![](y.png) `![](code.png)`")
    1
    """
    return sum(not alt.strip() for alt in _IMAGE.findall(_prose(text)))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_image_of_a_notebook_resolves(notebook):
    text = _markdown_of(notebook)
    problems = broken_links(text, notebook.parent)
    if images_without_alt_text(text):
        problems.append(f"{images_without_alt_text(text)} image(s) without alt text: write what the figure shows")
    assert not problems, f"{notebook.relative_to(ROOT)}:\n" + "\n".join(problems)


OBJECTIVES = "**By the end of this lesson you can:**"
TAKEAWAYS = "## Takeaways"
_BULLET = re.compile(r"^- \S", re.MULTILINE)


@pytest.mark.parametrize("lesson", sorted((ROOT / "lessons").glob("*.ipynb")), ids=lambda p: p.name)
def test_every_lesson_opens_with_objectives_and_ends_with_takeaways(lesson):
    cells = nbformat.read(lesson, as_version=4).cells
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# "), (
        f"{lesson.name}: the first cell should be the title and introduction")
    objectives, last = cells[1], cells[-1]
    assert objectives.cell_type == "markdown" and objectives.source.startswith(OBJECTIVES), (
        f"{lesson.name}: the cell after the introduction should start with {OBJECTIVES!r}")
    assert 3 <= len(_BULLET.findall(objectives.source)) <= 5, (
        f"{lesson.name}: 3 to 5 objectives, each a concrete thing the learner can then do")
    assert last.cell_type == "markdown" and last.source.startswith(TAKEAWAYS), (
        f"{lesson.name}: the last cell should be {TAKEAWAYS!r}")
    assert 3 <= len(_BULLET.findall(last.source)) <= 6, f"{lesson.name}: 3 to 6 takeaways"


def test_the_tour_links_every_lesson_and_lab_in_the_readme_order():
    text = _markdown_of(TOUR)
    problems = broken_links(text, TOUR.parent)
    assert not problems, "lessons/00_tour.ipynb has broken links:\n" + "\n".join(problems)

    roadmap = _course_files(links(text), TOUR.parent)
    missing = [str(p.relative_to(ROOT)) for p in COURSE if p.resolve() not in roadmap]
    assert not missing, f"lesson 00's roadmap does not link {missing}"

    rows = [line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
            if re.match(r"\| (\d\d|lab \d\d) \|", line)]
    readme_order = _course_files([links(row)[0] for row in rows if links(row)], ROOT)
    assert [p.name for p in roadmap] == [p.name for p in readme_order], (
        "lesson 00's roadmap and the README's course table list the notebooks in different orders:\n"
        f"  roadmap: {[p.name for p in roadmap]}\n  README:  {[p.name for p in readme_order]}")
    for page in ("GLOSSARY.md", "WHERE_NEXT.md"):
        assert f"../docs/{page}" in links(text), f"lesson 00 does not link docs/{page}"


def test_the_glossary_says_where_each_lesson_and_lab_teaches():
    glossary = ROOT / "docs" / "GLOSSARY.md"
    taught = _course_files(links(glossary.read_text(encoding="utf-8")), glossary.parent)
    missing = [str(p.relative_to(ROOT)) for p in COURSE if p.resolve() not in taught]
    assert not missing, f"docs/GLOSSARY.md links no term to {missing}"
