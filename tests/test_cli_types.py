"""masa_rt.cli_types: checked numeric argparse types and the output path check."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from masa_rt.cli_types import (
    check_output_path,
    float_range,
    nonnegative_int,
    positive_float,
    positive_int,
    probability,
)


@pytest.mark.parametrize("parse, text, value", [
    (positive_int, "3", 3), (nonnegative_int, "0", 0), (positive_float, "1e-4", 1e-4),
    (probability, "1", 1.0), (float_range(0.0, 1.0, hi_open=True), "0", 0.0),
])
def test_accepts_values_in_range(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize("parse, text, said", [
    (positive_int, "0", "expected an integer >= 1, found '0'"),
    (positive_int, "x", "expected an integer >= 1, found 'x'"),
    (nonnegative_int, "-2", "expected an integer >= 0, found '-2'"),
    (positive_float, "0", "expected a finite number > 0, found '0'"),
    (positive_float, "nan", "expected a finite number > 0, found 'nan'"),
    (positive_float, "inf", "expected a finite number > 0, found 'inf'"),
    (probability, "1.5", "expected a finite number >= 0 and <= 1, found '1.5'"),
    (float_range(0.0, 1.0, hi_open=True), "1", "expected a finite number >= 0 and < 1"),
])
def test_refuses_values_out_of_range(parse, text, said):
    with pytest.raises(argparse.ArgumentTypeError, match="^" + said.replace("+", r"\+")):
        parse(text)


def test_argparse_names_the_flag(capsys):
    parser = argparse.ArgumentParser(prog="masa-rt x")
    parser.add_argument("--max-videos", type=positive_int)
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-videos", "0"])
    assert "argument --max-videos: expected an integer >= 1, found '0'" in capsys.readouterr().err


def test_output_path_that_is_an_input_or_a_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"output demo.npz is also an input \(\./demo.npz\)"):
        check_output_path("demo.npz", ["./demo.npz", None])
    with pytest.raises(ValueError, match="is a directory"):
        check_output_path(tmp_path, [])
    assert check_output_path("new.npz", ["demo.npz", None]) == Path("new.npz")
