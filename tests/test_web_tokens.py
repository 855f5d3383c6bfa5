"""Browser tokens (clients/web/tokens.py): the file's rules, lookup, revocation."""

from __future__ import annotations

import os

import pytest

from clients.web.tokens import TokenFile, TokenFileError, parse_tokens

GOOD = "operator  operator-token-0123456789\n# a comment\n\nheadset1 headset-token-0123456789\n"


def _write(path, text, mode=0o600):
    path.write_text(text)
    path.chmod(mode)
    return path


def test_names_and_tokens_are_read_and_checked_by_value(tmp_path):
    tokens = TokenFile(_write(tmp_path / "t", GOOD))
    assert tokens.check("operator-token-0123456789") == "operator"
    assert tokens.check("headset-token-0123456789") == "headset1"
    assert tokens.check("operator-token-012345678") is None  # a prefix is not the token
    assert tokens.check(None) is None and tokens.check(b"bytes") is None


@pytest.mark.parametrize("text, message", [
    ("alice\n", ":1: expected 'NAME TOKEN'"),
    ("al/ce token-0123456789abcdef\n", ":1: expected 'NAME TOKEN'"),
    ("alice short\n", ":1: token of alice is shorter than 16"),
    ("a token-0123456789abcdef\na token-0123456789abcdeg\n", ":2: a is listed twice"),
    ("# nothing\n", "no tokens"),
])
def test_a_bad_file_is_one_line_naming_the_line(text, message):
    with pytest.raises(TokenFileError, match=message):
        parse_tokens(text, "tokens")


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_a_file_others_can_read_is_refused_and_then_admits_nobody(tmp_path):
    path = _write(tmp_path / "t", GOOD, 0o644)
    with pytest.raises(TokenFileError, match="chmod 600"):
        TokenFile(path)
    path.chmod(0o600)
    tokens = TokenFile(path)
    path.chmod(0o640)  # loosened while serving: nobody gets in until it is fixed
    assert tokens.check("operator-token-0123456789") is None


def test_removing_a_line_revokes_that_token(tmp_path):
    path = _write(tmp_path / "t", GOOD)
    tokens = TokenFile(path)
    assert tokens.check("headset-token-0123456789") == "headset1"
    _write(path, "operator operator-token-0123456789\n")
    assert tokens.check("headset-token-0123456789") is None
    assert tokens.check("operator-token-0123456789") == "operator"
