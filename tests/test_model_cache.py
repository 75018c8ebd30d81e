"""loracore.model_cache: a GGUF model converted once to a safetensors folder, written whole or
not at all (loracore.atomic), checked against its manifest, one builder at a time.

The 'GGUF' here loads as the tiny model, so a build takes a fraction of a second.
"""

from __future__ import annotations

import fcntl
import json
import threading

import pytest
import transformers

from loracore import model_cache, models
from loracore.atomic import write_folder
from loracore.model_cache import CACHE_FORMAT, MANIFEST, build_gguf_cache, cache_lock, cache_problem


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """Loading with ``gguf_file=`` gives the tiny model; counts the conversions."""
    calls = {"n": 0}
    real_model = transformers.AutoModelForCausalLM.from_pretrained
    real_tokenizer = transformers.AutoTokenizer.from_pretrained

    def model(*args, **kwargs):
        if "gguf_file" not in kwargs:
            return real_model(*args, **kwargs)
        calls["n"] += 1
        return models.build_tiny_qwen2()[0]

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: models.byte_tokenizer() if "gguf_file" in k
                        else real_tokenizer(*a, **k))
    return calls


def build(target, **kw):
    return build_gguf_cache(target, lambda: target.parent / "fake.gguf", name="Tiny",
                            description="tiny (test)", verbose=False, **kw)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_build_is_a_loadable_folder_with_a_manifest(fake_gguf, tmp_path):
    target = tmp_path / "cache" / "tiny"
    assert build(target) == target and cache_problem(target) is None
    manifest = json.loads((target / MANIFEST).read_text())
    assert manifest["format"] == CACHE_FORMAT and manifest["source"].endswith("fake.gguf")
    assert set(manifest["files"]) == {p.name for p in target.iterdir()} - {MANIFEST}
    config = json.loads((target / "config.json").read_text())
    assert config["_name_or_path"] == "tiny (test)" and "quantization_config" not in config
    model = transformers.AutoModelForCausalLM.from_pretrained(target)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert sorted(p.name for p in target.parent.iterdir()) == [".tiny.lock", "tiny"]


def test_a_complete_cache_is_trusted_without_asking_for_the_gguf(fake_gguf, tmp_path):
    target = tmp_path / "tiny"
    build(target)

    def gone():
        raise AssertionError("the GGUF was asked for, but the cache is complete")

    assert build_gguf_cache(target, gone, name="Tiny", description="x", verbose=False) == target
    assert fake_gguf["n"] == 1


def test_a_rebuild_replaces_the_whole_folder(fake_gguf, tmp_path, capsys):
    target = tmp_path / "tiny"
    build(target)
    (target / "pytorch_model.bin").write_bytes(b"an older layout's weights")
    (target / "config.json").write_text("{}")  # and a damaged file
    assert cache_problem(target) == "config.json has 2 bytes, expected " + \
        str(json.loads((target / MANIFEST).read_text())["files"]["config.json"]["size"])
    build_gguf_cache(target, lambda: tmp_path / "fake.gguf", name="Tiny", description="tiny (test)")
    assert "rebuilding the Tiny cache" in capsys.readouterr().out
    assert fake_gguf["n"] == 2 and cache_problem(target) is None
    assert not (target / "pytorch_model.bin").exists()  # nothing of the old build stays


def test_a_crash_during_a_rebuild_keeps_the_old_complete_cache(fake_gguf, tmp_path, monkeypatch):
    import safetensors.torch

    target = tmp_path / "tiny"
    build(target)
    before = snapshot(target)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(safetensors.torch, "save_model", crash)
    with pytest.raises(KeyboardInterrupt):
        build(target, force=True)
    assert snapshot(target) == before and cache_problem(target) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny.lock", "tiny"]  # no temp left


def test_a_missing_gguf_is_reported_and_nothing_is_written(tmp_path):
    target = tmp_path / "tiny"

    def missing():
        raise models.BaseModelError("install the package")

    with pytest.raises(models.BaseModelError, match="install the package"):
        build_gguf_cache(target, missing, name="Tiny", description="x", verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny.lock"]


@pytest.mark.parametrize("manifest, problem", [
    (None, "no manifest (never built, or interrupted)"),
    ("{not json", "unreadable manifest"),
    (json.dumps({"format": CACHE_FORMAT}), "unreadable manifest"),
    (json.dumps({"format": CACHE_FORMAT + 1, "files": {}}),
     f"cache format {CACHE_FORMAT + 1}, expected {CACHE_FORMAT}"),
    (json.dumps({"format": CACHE_FORMAT, "files": {"w": {"size": 1, "sha256": "0"}}}),
     "w is missing"),
])
def test_cache_problem_names_what_is_wrong(tmp_path, manifest, problem):
    if manifest is not None:
        (tmp_path / MANIFEST).write_text(manifest)
    assert cache_problem(tmp_path) == problem


def test_the_lock_admits_one_holder_at_a_time(tmp_path):
    took = []

    def try_lock():
        with open(tmp_path / ".tiny.lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                took.append(True)
            except BlockingIOError:
                took.append(False)

    with cache_lock(tmp_path, "tiny"):
        thread = threading.Thread(target=try_lock)
        thread.start()
        thread.join()
    try_lock()  # released: now it can be taken
    assert took == [False, True]


def test_the_smollm2_cache_keeps_its_lock_where_grading_expects_it(fake_gguf, monkeypatch, tmp_path):
    monkeypatch.setenv("LORACORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: tmp_path / "fake.gguf")
    folder = models.build_smollm2_cache(verbose=False)
    assert folder == models.smollm2_cache_dir() == model_cache.cache_root() / "smollm2-135m-instruct"
    assert (model_cache.cache_root() / ".smollm2.lock").is_file()
    assert json.loads((folder / "config.json").read_text())["_name_or_path"] == \
        models.SMOLLM2_DESCRIPTION


# ---- loracore.atomic.write_folder(keep_others=False), which the cache relies on -----------
@pytest.mark.parametrize("keep_others", [True, False])
def test_write_folder_keeps_other_files_only_when_asked(tmp_path, keep_others):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a").write_text("old a")
    (folder / "mine").write_text("a user's file")
    write_folder(folder, lambda tmp: (tmp / "a").write_text("new a"), keep_others=keep_others)
    assert (folder / "a").read_text() == "new a"
    assert (folder / "mine").exists() == keep_others


def test_write_folder_without_others_fails_half_way_and_leaves_the_folder_as_it_was(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a").write_text("old a")
    (folder / "mine").write_text("a user's file")
    before = snapshot(folder)

    def half(tmp):
        (tmp / "a").write_text("new a")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder(folder, half, keep_others=False)
    assert snapshot(folder) == before and [p.name for p in tmp_path.iterdir()] == ["f"]
