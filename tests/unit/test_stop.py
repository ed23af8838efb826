"""Stop strings over streamed deltas."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraplex.server.engine.stop import StopChecker


def run(stop: tuple[str, ...], deltas: list[str]) -> tuple[list[str], bool, str]:
    """Feed deltas until a hit; return (emitted per delta, hit, flushed tail)."""
    checker = StopChecker(stop)
    emitted = []
    for delta in deltas:
        text, hit = checker.feed(delta)
        emitted.append(text)
        if hit:
            return emitted, True, checker.flush()
    return emitted, False, checker.flush()


def reference(stop: tuple[str, ...], text: str) -> tuple[str, bool]:
    """Character by character: cut before the first stop string to complete (longest on ties)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stop if text[:end].endswith(s)]
        if done:
            return text[:end - max(len(s) for s in done)], True
    return text, False


def test_no_stop_strings_pass_everything_through():
    emitted, hit, tail = run((), ["a", "bc", ""])
    assert emitted == ["a", "bc", ""] and not hit and tail == ""


def test_stop_inside_one_delta_truncates_it():
    emitted, hit, _ = run(("END",), ["hello END world"])
    assert emitted == ["hello "] and hit


def test_stop_spanning_three_deltas():
    emitted, hit, tail = run(("<stop>",), ["abc<s", "to", "p>ignored"])
    assert emitted == ["abc", "", ""] and hit and tail == ""


def test_held_text_released_when_prefix_breaks():
    emitted, hit, _ = run(("<stop>",), ["x<st", "ay"])
    assert emitted == ["x", "<stay"] and not hit


def test_flush_releases_held_back_text():
    emitted, hit, tail = run(("###",), ["one #", "#"])
    assert emitted == ["one ", ""] and not hit and tail == "##"


def test_stop_at_the_very_start():
    emitted, hit, _ = run(("User:",), ["User:", " hi"])
    assert emitted == [""] and hit


def test_overlapping_prefixes():
    # "aab" must be found although the text first looks like a wrong start of it.
    emitted, hit, _ = run(("aab",), ["a", "a", "a", "b", "c"])
    assert "".join(emitted) == "a" and hit


def test_multiple_stops_first_to_complete_wins():
    emitted, hit, _ = run(("abcd", "bc"), ["abcd"])
    assert emitted == ["a"] and hit
    emitted, hit, _ = run(("\n\n", "Observation"), ["Thought: x\nObserv", "ation: y\n\n"])
    assert "".join(emitted) == "Thought: x\n" and hit


def test_ties_prefer_the_longer_stop():
    emitted, hit, _ = run(("c", "abc"), ["xab", "c"])
    assert "".join(emitted) == "x" and hit


def test_feed_after_hit_returns_nothing():
    checker = StopChecker(("x",))
    assert checker.feed("ax") == ("a", True)
    assert checker.feed("more") == ("", True)
    assert checker.flush() == ""


def test_rejects_empty_stop_string():
    with pytest.raises(ValueError, match="non-empty"):
        StopChecker(("ok", ""))


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab<>\n", max_size=30),
       stop=st.lists(st.text(alphabet="ab<>\n", min_size=1, max_size=4), min_size=1, max_size=3),
       cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=8))
def test_matches_character_level_reference_for_any_split(text, stop, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    emitted, hit, tail = run(tuple(stop), deltas)
    expected_text, expected_hit = reference(tuple(stop), text)
    assert hit == expected_hit
    assert "".join(emitted) + tail == expected_text
    for stop_string in stop:
        assert stop_string not in "".join(emitted)
