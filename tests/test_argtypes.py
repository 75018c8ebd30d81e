"""loracore.argtypes: the one rule for positive numbers on every command line (`loracore grade`,
`loracore finetune`): whole numbers >= 1, finite numbers > 0; NaN and infinities refused."""

from __future__ import annotations

import argparse
import hashlib

import pytest

from loracore.argtypes import positive_float, positive_int
from loracore.atomic import sha256_file
from loracore.cli import build_parser


@pytest.mark.parametrize("text, value", [("1", 1), ("16", 16), (" 7 ", 7), ("+3", 3)])
def test_positive_int_takes_whole_numbers_from_one(text, value):
    assert positive_int(text) == value and type(positive_int(text)) is int


@pytest.mark.parametrize("text, message", [
    ("0", "expected a number >= 1, got 0"), ("-2", "expected a number >= 1, got -2"),
    ("2.5", "expected a whole number, got '2.5'"), ("1e3", "expected a whole number, got '1e3'"),
    ("nan", "expected a whole number, got 'nan'"), ("", "expected a whole number, got ''"),
])
def test_positive_int_refuses_with_what_it_expected(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{message}$".replace("+", r"\+")):
        positive_int(text)


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("600", 600.0), ("5e-324", 5e-324),
                                         ("1.7e308", 1.7e308)])
def test_positive_float_takes_finite_numbers_above_zero(text, value):
    assert positive_float(text) == value


@pytest.mark.parametrize("text", ["nan", "NaN", "-nan", "inf", "+inf", "-inf", "Infinity", "1e999",
                                  "0", "0.0", "-0.0", "-1"])
def test_positive_float_refuses_nan_infinities_zero_and_negatives(text):
    with pytest.raises(argparse.ArgumentTypeError, match=f"^expected a finite number > 0, got "):
        positive_float(text)


def test_positive_float_refuses_a_word():
    with pytest.raises(argparse.ArgumentTypeError, match="^expected a number, got 'fast'$"):
        positive_float("fast")


@pytest.mark.parametrize("option, text, message", [
    ("--timeout", "nan", "expected a finite number > 0, got nan"),
    ("--timeout", "inf", "expected a finite number > 0, got inf"),
    ("--jobs", "0", "expected a number >= 1, got 0"),
    ("--memory", "1.5", "expected a whole number, got '1.5'"),
])
def test_loracore_grade_uses_the_same_rule(capsys, option, text, message):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["grade", "lab01", "nb.ipynb", option, text])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {message}" in err


@pytest.mark.parametrize("option, text", [("--lr", "nan"), ("--max-grad-norm", "inf"),
                                          ("--lora-alpha", "-inf"), ("--steps", "1.0")])
def test_loracore_finetune_uses_the_same_rule(capsys, option, text):
    args = ["finetune", "--model", "tiny-qwen2", "--data", "d.jsonl", "--out", "o", "--steps", "1",
            f"{option}={text}"]  # "=": argparse would read a lone "-inf" as an option
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(args)
    assert exc.value.code == 2
    assert f"argument {option}: expected a " in capsys.readouterr().err


def test_sha256_file_is_the_digest_of_the_bytes(tmp_path):
    data = bytes(range(256)) * 40_000  # > 4 MiB: more than one chunk
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "missing")
