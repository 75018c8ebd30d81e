"""loracore.bench: the timing helpers every benchmark uses."""

import json

import pytest

from loracore import bench


def test_interleaved_medians_times_each_function_in_every_round():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
        return fn

    out = bench.interleaved_medians({"a": make("a"), "b": make("b")}, 5, warmup=2)
    assert set(out) == {"a", "b"} and all(t >= 0 for t in out.values())
    assert calls == {"a": 7, "b": 7}
    with pytest.raises(ValueError, match="repeats"):
        bench.interleaved_medians({"a": make("a")}, 0)


def test_interleaved_medians_turns_the_order_around_every_round():
    seen = []
    bench.interleaved_medians({k: (lambda k=k: seen.append(k)) for k in "abc"}, 3, warmup=0)
    assert "".join(seen) == "abccbaabc"


def test_write_result_writes_json_atomically(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path)
    row = {"what": "x", "loracore": 1.0, "reference": 2.0, "reference_name": "ref",
           "unit": "s", "ratio": 0.5, "target": "<= 1"}
    path = bench.write_result("demo", [row])
    data = json.loads(path.read_text())
    assert data["rows"] == [row] and "cores" in data["machine"]
    assert [p.name for p in tmp_path.iterdir()] == ["demo.json"]
