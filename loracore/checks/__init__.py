"""Self-checks for the labs, one module per lab (``from loracore.checks import lab01``).

Each ``check_*`` function runs the learner's code on small, seeded inputs, compares it with
loracore's own implementation and prints one line per fact via :mod:`loracore.selfcheck`.
"""
