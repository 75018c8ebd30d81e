"""The order pytest-xdist hands out files in (``make test``): the longest first.

With ``--dist loadfile`` each worker takes a whole file (a notebook's cells stay together, in
order), and whichever worker is free takes the next. A long file taken last keeps the other
workers idle at the end, so the files are sorted by their measured seconds,
``tools/test_durations.json`` (written by ``tools/notebook_times.py LOG --durations-json``
from a ``--durations=0`` run), longest first; a file not in it counts as one second. Inside a
file nothing moves. The Makefile passes ``--no-loadscope-reorder``, without which pytest-xdist
would sort the files by their number of tests instead. The order changes no result, only when
each file starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DURATIONS = Path(__file__).resolve().parent / "tools" / "test_durations.json"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not DURATIONS.exists():
        return
    seconds = json.loads(DURATIONS.read_text())
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        first.setdefault(item.nodeid.split("::")[0], i)
    # a stable sort on (seconds, first position): each file's items keep their order
    items.sort(key=lambda item: (-seconds.get(item.nodeid.split("::")[0], 1.0),
                                 first[item.nodeid.split("::")[0]]))
