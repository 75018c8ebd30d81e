"""loracore.data and the course's data sets: reading, checking, prompt masking, padding."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from loracore.data import (
    IGNORE_INDEX,
    DataError,
    collate,
    load_chat_jsonl,
    load_sft_dataset,
    make_dataloader,
    prompt_text,
    tokenize_chat,
    tokenize_example,
)
from loracore.models import load_base_model

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="module")
def tokenizer():
    return load_base_model("tiny-qwen2")[1]


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- reading and checking

def test_load_chat_jsonl_reads_rows_and_records_their_lines(tmp_path):
    path = write_lines(tmp_path / "ok.jsonl",
                       [json.dumps(chat("Q1?", "A1.")), "", json.dumps(chat("Q2?", "A2."))])
    ds = load_chat_jsonl(path)
    assert len(ds) == 2
    assert ds[1]["messages"][-1] == {"role": "assistant", "content": "A2."}
    assert ds["source"] == ["ok.jsonl:1", "ok.jsonl:3"]  # the blank line is skipped, not renumbered
    assert len(load_chat_jsonl(path, limit=1)) == 1


def test_empty_file_is_a_clear_error(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match=r"empty\.jsonl.*no examples"):
        load_chat_jsonl(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_chat_jsonl(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("bad, pattern", [
    ({"question": "Q?", "answer": "A."}, r"bad\.jsonl:2: missing the field 'messages'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "A"}]},
     r"bad\.jsonl:2: messages\[0\] is missing the field 'content'"),
    ({"messages": [{"content": "Q"}]}, r"bad\.jsonl:2: messages\[0\] is missing the field 'role'"),
    ({"messages": [{"role": "user", "content": "Q?"}]}, r"bad\.jsonl:2: the last message must be"),
    ({"messages": [{"role": "robot", "content": "Q?"}]}, r"bad\.jsonl:2: .*role 'robot'"),
    ({"messages": []}, r"bad\.jsonl:2: 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  "}]},
     r"bad\.jsonl:2: the assistant's answer is empty"),
])
def test_bad_line_names_file_line_and_field(tmp_path, bad, pattern):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(chat("Q?", "A.")), json.dumps(bad)])
    with pytest.raises(DataError, match=pattern):
        load_chat_jsonl(path)


def test_invalid_json_names_the_line(tmp_path):
    path = write_lines(tmp_path / "broken.jsonl", [json.dumps(chat("Q?", "A.")), "{not json"])
    with pytest.raises(DataError, match=r"broken\.jsonl:2: not valid JSON"):
        load_chat_jsonl(path)


# ---------------------------------------------------------------- prompt masking

def test_labels_mask_exactly_the_prompt(tokenizer):
    messages = chat("What is the capital of Kimland?", "Fusima.")["messages"]
    ex = tokenize_example(tokenizer, messages)
    prompt_ids = tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert ex["input_ids"][:n] == prompt_ids
    assert ex["labels"][:n] == [IGNORE_INDEX] * n          # no loss on any prompt token
    assert ex["labels"][n:] == ex["input_ids"][n:]         # loss on every answer token
    answer = tokenizer.decode(ex["input_ids"][n:])
    assert answer.startswith("Fusima.<|im_end|>")          # the answer and the end-of-turn token


def test_prompt_is_rendered_with_the_models_chat_template(tokenizer):
    messages = chat("Q?", "A.")["messages"]
    assert prompt_text(tokenizer, messages) == tokenizer.apply_chat_template(
        messages[:1], tokenize=False, add_generation_prompt=True)


def test_too_long_example_is_reported_not_cut(tmp_path, tokenizer):
    path = write_lines(tmp_path / "long.jsonl", [json.dumps(chat("Q?", "A.")),
                                                 json.dumps(chat("Q?", "a very long answer " * 20))])
    ds = load_chat_jsonl(path)
    with pytest.raises(DataError, match=r"max_length=64 tokens: long\.jsonl:2 \(\d+ tokens\)"):
        tokenize_chat(ds, tokenizer, max_length=64)
    kept = tokenize_chat(ds, tokenizer, max_length=64, on_too_long="skip")
    assert kept["source"] == ["long.jsonl:1"]
    # Nothing kept is truncated: every kept example still ends with the end-of-turn token.
    assert tokenizer.decode(kept[0]["input_ids"]).rstrip().endswith("A.<|im_end|>")


def test_nothing_fits_is_an_error(tmp_path, tokenizer):
    path = write_lines(tmp_path / "all_long.jsonl", [json.dumps(chat("Q?" * 50, "A."))])
    with pytest.raises(DataError, match="every example is longer"):
        load_sft_dataset(path, tokenizer, max_length=16, on_too_long="skip")


# ---------------------------------------------------------------- padding and batching

def test_collate_pads_right_with_masks():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                {"input_ids": [8], "labels": [8]}]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = collate(examples, pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_rejects_mismatched_labels_and_empty_batches():
    with pytest.raises(DataError, match="example 0 has 2 input_ids but 1 labels"):
        collate([{"input_ids": [1, 2], "labels": [1]}], pad_id=0)
    with pytest.raises(DataError, match="empty list"):
        collate([], pad_id=0)


def test_dataloader_is_seeded(tokenizer):
    ds = load_sft_dataset(DATA / "capitals_train.jsonl", tokenizer, max_length=128, limit=12)

    def order(seed: int) -> list[list[int]]:
        return [b["input_ids"][:, -12:].tolist() for b in make_dataloader(ds, tokenizer, batch_size=4, seed=seed)]

    assert order(0) == order(0)
    assert order(0) != order(1)
    batches = list(make_dataloader(ds, tokenizer, batch_size=5, shuffle=False))
    assert [b["input_ids"].shape[0] for b in batches] == [5, 5, 2]


# ---------------------------------------------------------------- the course's data files

def _make_data():
    spec = importlib.util.spec_from_file_location("make_data", DATA / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


def test_data_files_are_what_make_data_writes():
    md = _make_data()
    cap_train, cap_test = md.capitals_sets()
    rec_train, rec_test = md.records_sets()
    assert _read("capitals_train.jsonl") == cap_train and _read("capitals_test.jsonl") == cap_test
    assert _read("records_train.jsonl") == rec_train and _read("records_test.jsonl") == rec_test
    assert _read("probe.jsonl") == md.probe_set()
    assert md.capitals_sets() == (cap_train, cap_test)  # deterministic


def test_capitals_test_phrasing_is_held_out():
    train, test = _read("capitals_train.jsonl"), _read("capitals_test.jsonl")
    assert (len(train), len(test)) == (72, 24)
    train_questions = {ex["messages"][0]["content"] for ex in train}
    train_answers = {ex["messages"][1]["content"] for ex in train}
    assert not any(ex["messages"][0]["content"] in train_questions for ex in test)
    assert {ex["messages"][1]["content"] for ex in test} == train_answers  # same facts
    assert len(train_answers) == 24  # every capital distinct
    assert not any("has its capital in which city" in q for q in train_questions)


def test_records_people_do_not_repeat_between_train_and_test():
    def names(rows):
        return {json.loads(ex["messages"][1]["content"])["name"] for ex in rows}

    train, test = _read("records_train.jsonl"), _read("records_test.jsonl")
    assert not names(train) & names(test)
    for ex in train + test:
        record = json.loads(ex["messages"][1]["content"])
        assert list(record) == ["name", "age", "city"] and isinstance(record["age"], int)


def test_every_data_file_loads():
    for name in ("capitals_train", "capitals_test", "records_train", "records_test", "probe"):
        assert len(load_chat_jsonl(DATA / f"{name}.jsonl")) > 0


# ---------------------------------------------------------------- lab 02's self-check

def test_lab02_mask_and_pad_check_accepts_right_and_rejects_unmasked():
    from loracore.checks.lab02 import check_mask_and_pad
    from loracore.selfcheck import ExerciseFailed

    def right(examples, pad_id):
        return collate([{"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a} for p, a in examples],
                       pad_id)

    def unmasked(examples, pad_id):  # the classic mistake: loss on the prompt too
        return collate([{"input_ids": p + a, "labels": p + a} for p, a in examples], pad_id)

    check_mask_and_pad(right)
    with pytest.raises(ExerciseFailed, match="1 of 7 checks failed"):
        check_mask_and_pad(unmasked)


# ---- hostile data files ------------------------------------------------------------------
@pytest.fixture(scope="module")
def base():
    """The tiny random Qwen2 and its tokenizer, loaded once; tests work on deep copies."""
    return load_base_model("tiny-qwen2", verbose=False)



def chat_line(q: str = "Capital of France?", a: str = "Paris") -> str:
    return json.dumps({"messages": [{"role": "user", "content": q},
                                    {"role": "assistant", "content": a}]})


@pytest.fixture
def good_file(tmp_path) -> Path:
    path = tmp_path / "good.jsonl"
    path.write_text("\n".join(chat_line(f"q{i}", f"a{i}") for i in range(3)) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("limit", [0, -1, 1.5, 2.0, True, "3"])
def test_load_chat_jsonl_refuses_a_limit_that_is_not_a_positive_int(good_file, limit):
    with pytest.raises(DataError, match=rf"load_chat_jsonl: limit must be a positive integer, "
                                        rf"got {limit!r}"):
        load_chat_jsonl(good_file, limit=limit)


def test_load_chat_jsonl_limit_one_and_none(good_file):
    assert len(load_chat_jsonl(good_file, limit=1)) == 1
    assert len(load_chat_jsonl(good_file, limit=10)) == len(load_chat_jsonl(good_file)) == 3


@pytest.mark.parametrize("raw, what", [
    ("Caf\xe9".encode("latin-1"), rb"b'\\xe9'"),   # Latin-1 text
    (b"\xff\xfe", rb"b'\\xff'"),                   # a UTF-16 byte-order mark
    (b"\xed\xa0\x80", rb"b'\\xed'"),               # a surrogate encoded as UTF-8 (CESU-8)
])
def test_bytes_that_are_not_utf8_are_named_by_file_and_line(tmp_path, raw, what):
    path = tmp_path / "mixed.jsonl"
    line3 = b'{"messages": [{"role": "user", "content": "' + raw + \
            b'"}, {"role": "assistant", "content": "x"}]}'
    data = (chat_line() + "\n\n").encode() + line3 + b"\n" + chat_line().encode() + b"\n"
    path.write_bytes(data)
    with pytest.raises(DataError, match=r"mixed\.jsonl:3: not UTF-8 text \(byte \d+ of the line "
                                        r"is " + what.decode() + r"\); save the file as UTF-8"):
        load_chat_jsonl(path)
    assert path.read_bytes() == data  # reading never rewrites the file


@pytest.mark.parametrize("content", ["\\ud800", "ok \\udfff", "\\udc00\\ud800"])
def test_lone_surrogate_escapes_are_named_by_file_and_line(tmp_path, content):
    path = tmp_path / "surrogates.jsonl"
    bad = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "%s"}]}'
    path.write_text(chat_line() + "\n" + bad % content + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"surrogates\.jsonl:2: messages\[1\]\['content'\] "
                                        r".*lone surrogate"):
        load_chat_jsonl(path)


def test_a_valid_surrogate_pair_and_a_byte_order_mark_are_fine(tmp_path):
    path = tmp_path / "ok.jsonl"
    pair = chat_line("emoji?", "\\ud83d\\ude00").replace("\\\\", "\\")
    path.write_bytes(b"\xef\xbb\xbf" + (chat_line() + "\n" + pair + "\n").encode())
    ds = load_chat_jsonl(path)
    assert len(ds) == 2 and ds[1]["messages"][1]["content"] == "\U0001F600"


@pytest.mark.parametrize("line, message", [
    ('{"messages": [', r"broken\.jsonl:2: not valid JSON \(Expecting value, column 15\)"),
    ("[1, 2]", r"broken\.jsonl:2: each line must be a JSON object, got list"),
    ('{"msgs": []}', r"broken\.jsonl:2: missing the field 'messages'"),
    ("[" * 100000 + "]" * 100000, r"broken\.jsonl:2: (JSON nested too deeply|not valid JSON)"),
])
def test_broken_lines_are_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "broken.jsonl"
    path.write_text(chat_line() + "\n" + line + "\n" + chat_line() + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_chat_jsonl(path)


def test_a_folder_is_not_a_file(tmp_path):
    with pytest.raises(DataError, match="load_chat_jsonl: .* is a folder; pass the .jsonl file"):
        load_chat_jsonl(tmp_path)



# ---- batches ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenized(base):
    return load_sft_dataset(DATA / "capitals_train.jsonl", base[1], max_length=128, limit=4)


@pytest.mark.parametrize("batch_size", [0, -2, 2.0, True, None])
def test_make_dataloader_refuses_a_batch_size_that_is_not_a_positive_int(base, tokenized, batch_size):
    with pytest.raises(DataError, match=rf"make_dataloader: batch_size must be a positive integer, "
                                        rf"got {batch_size!r}"):
        make_dataloader(tokenized, base[1], batch_size=batch_size)


@pytest.mark.parametrize("max_length", [0, 64.0])
def test_tokenize_chat_refuses_a_max_length_that_is_not_a_positive_int(base, good_file, max_length):
    with pytest.raises(DataError, match=rf"tokenize_chat: max_length must be a positive integer, "
                                        rf"got {max_length!r}"):
        load_sft_dataset(good_file, base[1], max_length=max_length)


def test_collate_names_a_missing_key():
    with pytest.raises(DataError, match=r"collate: example 1 has no \['labels'\]"):
        collate([{"input_ids": [1], "labels": [1]}, {"input_ids": [1, 2]}], pad_id=0)
