"""Chat-format supervised examples: from a JSONL file to padded training batches.

The path of one example, which the lab asks you to rebuild yourself:

1. :func:`load_chat_jsonl` reads a file where every line is one conversation,
   ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}``,
   checks it and returns a ``datasets.Dataset``. A bad line is named by file and line number.
2. :func:`tokenize_chat` renders each conversation with *the model's own chat template*
   and marks which tokens are the answer: ``labels`` holds the token id on answer tokens and
   ``-100`` (PyTorch's "ignore" index) on prompt tokens, so the loss only teaches the answer.
   An example longer than ``max_length`` is reported, never cut mid-answer.
3. :func:`collate` pads a list of examples to one rectangle: ``input_ids``, ``attention_mask``
   (1 = real token) and ``labels`` (``-100`` on padding too).
4. :func:`make_dataloader` shuffles (seeded) and batches with :func:`collate`.

Every function works with any Hugging Face tokenizer that has a chat template.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from datasets import Dataset
from torch.utils.data import DataLoader

#: Label value that ``torch.nn.functional.cross_entropy`` skips: "no loss on this token".
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file or example the course's pipeline cannot use; the message says where and why."""


# ----------------------------------------------------------------------------------------
# 1. Reading and checking a JSONL file
# ----------------------------------------------------------------------------------------
def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """Return ``messages`` if it is a valid conversation ending with the answer, else raise."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of "
                        f"{{'role', 'content'}} objects, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be an object, got {type(m).__name__}")
        for field in ("role", "content"):
            if field not in m:
                raise DataError(f"{where}: messages[{i}] is missing the field '{field}'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}] has role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: messages[{i}]['content'] must be a string, "
                            f"got {type(m['content']).__name__}")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer (the text to "
                        f"learn), got role {messages[-1]['role']!r}")
    if not messages[-1]["content"].strip():
        raise DataError(f"{where}: the assistant's answer is empty")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_count(value: Any, name: str, where: str) -> None:
    """``value`` must be a positive int (a bool, a float or 0 is refused): raises
    :class:`DataError` ``"{where}: {name} must be a positive integer, got {value!r}"``.
    Used for the pipeline's sizes (limit, max_length, batch_size) and by
    :mod:`loracore.evaluate`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{where}: {name} must be a positive integer, got {value!r}")


def _unencodable(obj: Any, path: str = "") -> str | None:
    """The JSON path of the first string in ``obj`` that UTF-8 cannot encode (a lone
    surrogate such as ``"\\ud800"``, valid JSON but not text), else None."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"{path or 'the value'} (character {exc.start}: {obj[exc.start]!r})"
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        found = _unencodable(key, f"{path}[key]") if isinstance(key, str) else None
        found = found or _unencodable(value, f"{path}[{key!r}]")
        if found:
            return found
    return None


def load_chat_jsonl(path: str | Path, *, limit: int | None = None) -> Dataset:
    """Read a chat-format JSONL file into a ``datasets.Dataset``, checking every line.

    Each non-blank line must be a JSON object with a ``"messages"`` list whose last entry is
    the assistant's answer. Returns a dataset with the columns ``messages`` and ``source``
    (``"file.jsonl:LINE"``, so any later report can point back at the line).

    ``limit`` keeps only the first ``limit`` examples (for short runs and data-size sweeps);
    it must be a positive integer (or None for all). Raises :class:`DataError` naming the
    file and line for a missing file, bytes that are not UTF-8, invalid JSON, a lone
    surrogate escape, a missing field, or an empty file. A UTF-8 byte-order mark on the
    first line is accepted.
    """
    if limit is not None:
        check_count(limit, "limit", "load_chat_jsonl")
    path = Path(path)
    if path.is_dir():
        raise DataError(f"load_chat_jsonl: {path} is a folder; pass the .jsonl file inside it")
    if not path.is_file():
        raise DataError(f"load_chat_jsonl: no such file: {path}")
    rows: list[dict[str, Any]] = []
    with path.open("rb") as f:  # bytes, so a decoding error can be pinned to its line
        for line_no, raw in enumerate(f, start=1):
            where = f"{path.name}:{line_no}"
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 text (byte {exc.start} of the line is "
                                f"{raw[exc.start:exc.start + 1]!r}); save the file as UTF-8 "
                                f"({path})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))  # so the column counts within the line
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            except RecursionError:
                raise DataError(f"{where}: JSON nested too deeply") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
            if "messages" not in obj:
                raise DataError(f"{where}: missing the field 'messages' (found fields: "
                                f"{sorted(obj)}); see data/README.md for the format")
            messages = _check_messages(obj["messages"], where)
            bad = _unencodable(messages, "messages")
            if bad:
                raise DataError(f"{where}: {bad} holds a lone surrogate escape (like \\ud800), "
                                f"which is not text and cannot be tokenized; fix that line")
            rows.append({"messages": messages, "source": where})
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise DataError(f"load_chat_jsonl: {path} holds no examples (empty file)")
    return Dataset.from_list(rows)


# ----------------------------------------------------------------------------------------
# 2. Chat template + prompt masking
# ----------------------------------------------------------------------------------------
def _encode(tokenizer: Any, text: str) -> list[int]:
    # The template already wrote every special token it wants; don't let the tokenizer add a BOS.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_text(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The text the model sees before it answers: every message but the last, rendered with
    the tokenizer's chat template, ending with the assistant header (``add_generation_prompt``)."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def tokenize_example(tokenizer: Any, messages: Sequence[dict[str, str]],
                     source: str = "example") -> dict[str, list[int]]:
    """Token ids and labels for one conversation whose last message is the answer.

    Returns ``{"input_ids": [...], "labels": [...]}`` of equal length, where ``labels`` is
    ``-100`` on every prompt token and equals ``input_ids`` on the answer tokens (the answer
    text plus the template's end-of-turn token, so the model also learns to stop).
    """
    full_ids = _encode(tokenizer, tokenizer.apply_chat_template(list(messages), tokenize=False))
    prompt_ids = _encode(tokenizer, prompt_text(tokenizer, messages))
    # Masking by length is only right if the prompt is a prefix of the whole conversation.
    # With chat templates it is (special tokens separate the turns); check rather than hope.
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise DataError(f"{source}: the tokenized prompt is not a prefix of the tokenized "
                        "conversation, so prompt tokens cannot be masked by position; does this "
                        "tokenizer's chat template change earlier turns when an answer is added?")
    if len(full_ids) == len(prompt_ids):
        raise DataError(f"{source}: the answer produced no tokens")
    labels = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids):]
    return {"input_ids": full_ids, "labels": labels}


def tokenize_chat(dataset: Dataset, tokenizer: Any, *, max_length: int = 64,
                  on_too_long: str = "error") -> Dataset:
    """Tokenize every conversation of ``dataset`` (from :func:`load_chat_jsonl`).

    Adds ``input_ids``, ``labels`` and ``length`` columns. An example with more than
    ``max_length`` tokens is never truncated (cutting it would teach half an answer):
    ``on_too_long="error"`` raises :class:`DataError` listing each one by file and line;
    ``"skip"`` drops them and prints which.
    """
    if on_too_long not in ("error", "skip"):
        raise ValueError(f"tokenize_chat: on_too_long must be 'error' or 'skip', got {on_too_long!r}")
    check_count(max_length, "max_length", "tokenize_chat")
    if len(dataset) == 0:
        raise DataError("tokenize_chat: the dataset is empty")
    sources = dataset["source"] if "source" in dataset.column_names else \
        [f"example {i}" for i in range(len(dataset))]
    kept: dict[str, list] = {"messages": [], "source": [], "input_ids": [], "labels": [], "length": []}
    too_long: list[str] = []
    for messages, source in zip(dataset["messages"], sources):
        ex = tokenize_example(tokenizer, messages, source)
        n = len(ex["input_ids"])
        if n > max_length:
            too_long.append(f"{source} ({n} tokens)")
            continue
        for key, value in (("messages", messages), ("source", source), ("length", n), *ex.items()):
            kept[key].append(value)
    if too_long:
        msg = (f"{len(too_long)} example(s) longer than max_length={max_length} tokens: "
               + ", ".join(too_long[:10]) + (" ..." if len(too_long) > 10 else ""))
        if on_too_long == "error":
            raise DataError(msg + ". Raise max_length, shorten them, or pass on_too_long='skip'.")
        print(f"tokenize_chat: skipped {msg}")
    if not kept["input_ids"]:
        raise DataError(f"tokenize_chat: every example is longer than max_length={max_length}")
    return Dataset.from_dict(kept)


def load_sft_dataset(path: str | Path, tokenizer: Any, *, max_length: int = 64,
                     limit: int | None = None, on_too_long: str = "error") -> Dataset:
    """:func:`load_chat_jsonl` then :func:`tokenize_chat`: a file, ready for :func:`make_dataloader`."""
    return tokenize_chat(load_chat_jsonl(path, limit=limit), tokenizer, max_length=max_length,
                         on_too_long=on_too_long)


# ----------------------------------------------------------------------------------------
# 3. Padding and batching
# ----------------------------------------------------------------------------------------
def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its end-of-sequence token.

    Padding positions are masked out of attention and loss, so which id fills them does not
    change any result; it only has to be a valid id.
    """
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise DataError("pad_token_id: the tokenizer has neither a pad token nor an eos token")
    return int(pid)


def collate(examples: Iterable[dict[str, Any]], pad_id: int,
            padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad examples (each with ``input_ids`` and ``labels`` lists) into one batch.

    Returns ``input_ids: (batch, seq)`` padded with ``pad_id``, ``attention_mask: (batch, seq)``
    (1 on real tokens, 0 on padding) and ``labels: (batch, seq)`` with ``-100`` on padding,
    where ``seq`` is the longest example. Training pads on the right, so real tokens keep
    their positions 0, 1, 2, ... exactly as when the example is alone.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"collate: padding_side must be 'left' or 'right', got {padding_side!r}")
    examples = list(examples)
    if not examples:
        raise DataError("collate: got an empty list of examples")
    for i, ex in enumerate(examples):
        missing = [k for k in ("input_ids", "labels") if not hasattr(ex, "keys") or k not in ex]
        if missing:
            raise DataError(f"collate: example {i} has no {missing}; each example needs "
                            f"'input_ids' and 'labels' lists (run tokenize_chat first)")
    seq = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), seq), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), seq), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), seq), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if len(ex["labels"]) != n:
            raise DataError(f"collate: example {i} has {n} input_ids but {len(ex['labels'])} labels")
        cols = slice(0, n) if padding_side == "right" else slice(seq - n, seq)
        input_ids[i, cols] = torch.tensor(ex["input_ids"])
        labels[i, cols] = torch.tensor(ex["labels"])
        attention_mask[i, cols] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_dataloader(dataset: Dataset, tokenizer: Any, *, batch_size: int = 8,
                    shuffle: bool = True, seed: int = 0) -> DataLoader:
    """Batches of :func:`collate` over a tokenized dataset, shuffled by a seeded generator
    (the same seed gives the same batches in the same order, epoch after epoch)."""
    check_count(batch_size, "batch_size", "make_dataloader")
    if len(dataset) == 0:
        raise DataError("make_dataloader: the dataset is empty")
    if "input_ids" not in dataset.column_names:
        raise DataError("make_dataloader: the dataset has no 'input_ids'; run tokenize_chat first")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset.select_columns(["input_ids", "labels"]), batch_size=batch_size,
                      shuffle=shuffle, generator=generator,
                      collate_fn=partial(collate, pad_id=pad_token_id(tokenizer)))


BATCH_KEYS = ("input_ids", "attention_mask", "labels")


def check_batch(batch: Any, where: str) -> None:
    """Raise :class:`DataError` (prefixed by ``where``) unless ``batch`` is a dict holding
    ``input_ids``, ``attention_mask`` and ``labels``: integer tensors of one ``(batch, seq)``
    shape, as :func:`collate` makes them."""
    if not isinstance(batch, dict):
        raise DataError(f"{where}: a batch must be a dict with {list(BATCH_KEYS)}, got "
                        f"{type(batch).__name__}")
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        hint = (" (the 1s over real tokens: torch.ones_like(input_ids) without padding)"
                if missing == ["attention_mask"] else "")
        raise DataError(f"{where}: the batch has no {', '.join(repr(k) for k in missing)}{hint}; "
                        f"it has {sorted(batch)}. make_dataloader/collate build all three")
    shape = None
    for key in BATCH_KEYS:
        t = batch[key]
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.is_floating_point() \
                or t.is_complex():
            raise DataError(f"{where}: batch[{key!r}] must be a 2-D integer tensor (batch, seq), "
                            f"got {getattr(t, 'dtype', type(t).__name__)} of shape "
                            f"{tuple(getattr(t, 'shape', ()))}")
        if shape is not None and t.shape != shape:
            raise DataError(f"{where}: batch[{key!r}] has shape {tuple(t.shape)} but input_ids "
                            f"has {tuple(shape)}")
        shape = t.shape
