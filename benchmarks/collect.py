"""Collect benchmarks/results/*.json into benchmarks/RESULTS.md (run by `make bench`)."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    results = [json.loads(p.read_text()) for p in sorted((HERE / "results").glob("*.json"))]
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` from `benchmarks/results/*.json`. Every figure is the median of",
        "several repeats; the reference is measured in the same run on the same machine, and",
        "ratio = loracore / reference (below 1 means loracore takes less of it).",
        "",
    ]
    for res in results:
        lines += [f"## {res['name']}", "", f"Machine: {res['machine']}; date: {res['date']}.", ""]
        lines += ["| what | loracore | reference | ratio | target |", "|---|---|---|---|---|"]
        for r in res["rows"]:
            lines.append(
                f"| {r['what']} | {r['loracore']:.4g} {r['unit']} | "
                f"{r['reference']:.4g} {r['unit']} ({r['reference_name']}) | "
                f"{r['ratio']:.3f} | {r.get('target', '-')} |")
        if res.get("notes"):
            lines += ["", res["notes"]]
        lines.append("")
    (HERE / "RESULTS.md").write_text("\n".join(lines))
    print(f"wrote {HERE / 'RESULTS.md'} ({len(results)} benchmarks)")


if __name__ == "__main__":
    main()
