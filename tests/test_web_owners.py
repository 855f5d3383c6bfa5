"""Session ownership per token name (clients/web/owners.py)."""

from __future__ import annotations

from clients.web.owners import SessionOwners


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_session_belongs_to_the_name_that_opened_it():
    owners = SessionOwners(max_per_client=2)
    assert owners.claim("s", "alice") is None
    assert owners.check("s", "alice") is None and owners.claim("s", "alice") is None  # resume
    assert owners.check("s", "bob") == "session_owner"
    assert owners.claim("s", "bob") == "session_owner"
    owners.release("s", "bob")  # another name's bye frees nothing
    assert owners.check("s", "bob") == "session_owner"
    owners.release("s", "alice")
    assert owners.claim("s", "bob") is None


def test_one_name_holds_at_most_max_per_client():
    owners = SessionOwners(max_per_client=2)
    assert owners.claim("a", "alice") is None and owners.claim("b", "alice") is None
    assert owners.claim("c", "alice") == "too_many_sessions"
    assert owners.claim("c", "bob") is None


def test_a_closed_page_keeps_its_sessions_for_hold_s():
    clock = Clock()
    owners = SessionOwners(hold_s=30.0, clock=clock)
    owners.claim("s", "alice")
    owners.hold({"s"}, "alice")
    clock.t = 29.0
    assert owners.check("s", "bob") == "session_owner"
    clock.t = 31.0
    assert owners.check("s", "bob") is None and owners.held_by("alice") == 0


def test_without_tokens_nothing_is_checked():
    owners = SessionOwners(max_per_client=1)
    assert owners.claim("s", None) is None and owners.claim("t", None) is None
    assert owners.check("s", None) is None
