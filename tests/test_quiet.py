"""loracore._quiet: the kernel-hub log filter is installed by ``import loracore``, once.
(What it drops and keeps is tested in test_env.py.)"""

from __future__ import annotations

import logging

import loracore
from loracore import _quiet


def _filters(name: str) -> list[logging.Filter]:
    return [f for f in logging.getLogger(name).filters if isinstance(f, _quiet._NoKernelsHubNotice)]


def test_import_installs_one_filter_per_logger_and_installing_again_adds_none():
    assert loracore._quiet is _quiet
    for name in _quiet.LOGGERS:
        assert len(_filters(name)) == 1, name
    _quiet.install()
    for name in _quiet.LOGGERS:
        assert len(_filters(name)) == 1, name
