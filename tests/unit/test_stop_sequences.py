"""StopScanner: stop sequences in streamed text, held back until settled (pure, no model)."""

from __future__ import annotations

import pytest

from app.inference.engine import StopScanner


def scan(pieces: list[str], stops: list[str] | None) -> tuple[list[str], str, bool]:
    """What each piece lets out, what flush lets out at the end, and whether a stop was hit."""
    scanner = StopScanner(stops)
    emitted = [scanner.feed(piece) for piece in pieces]
    return emitted, scanner.flush(), scanner.stopped


# (pieces, stops, emitted after each piece, flushed at the end, stopped)
STEPS = [
    (["Hello", " world"], None, ["Hello", " world"], "", False),
    (["Hello", " world"], ["zzz"], ["Hello", " world"], "", False),
    # The tail that could start a stop sequence waits for the next piece.
    (["Hello wo", "rld"], ["world"], ["Hello ", ""], "", True),
    (["Hello wo", "nder"], ["world"], ["Hello ", "wonder"], "", False),
    (["ab", "c", "d"], ["abcd"], ["", "", ""], "", True),
    (["ab", "c", "x"], ["abcd"], ["", "", "abcx"], "", False),
    # A held tail that no piece settles comes out on flush.
    (["say wor"], ["world"], ["say "], "wor", False),
    (["x\n"], ["\n\n"], ["x"], "\n", False),
    (["x\n", "\n", "more"], ["\n\n"], ["x", "", ""], "", True),
    # The stop sequence and what follows it never come out, not even on flush.
    (["1. a 2. b", " 3. c"], ["2."], ["1. a ", ""], "", True),
    (["END"], ["END"], [""], "", True),
    # Several stop sequences: the one completed first wins; on a tie, the longer one.
    (["xabcd"], ["bc", "abcd"], ["xa"], "", True),
    (["xab", "cd"], ["bc", "abcd"], ["x", "a"], "", True),
    (["xabcd"], ["abcd", "cd"], ["x"], "", True),
    # The longest tail that starts any stop sequence is held.
    (["aXYZ"], ["XYZ!", "Z?"], ["a"], "XYZ", False),
    (["aaa"], ["aab"], ["a"], "aa", False),
    # Once stopped, later pieces are dropped.
    (["stop", "more", "text"], ["stop"], ["", "", ""], "", True),
    # Empty pieces change nothing.
    (["", "ab", ""], ["b"], ["", "a", ""], "", True),
]


@pytest.mark.parametrize(("pieces", "stops", "emitted", "flushed", "stopped"), STEPS)
def test_stop_scanner_steps(
    pieces: list[str], stops: list[str] | None, emitted: list[str], flushed: str, stopped: bool
) -> None:
    assert scan(pieces, stops) == (emitted, flushed, stopped)


# (text, stops, the text that comes out in all, stopped)
TEXTS = [
    ("Hello world", None, "Hello world", False),
    ("Hello world", ["wor"], "Hello ", True),
    ("Hello world", ["world!"], "Hello world", False),
    ("The answer is 42.\nQ: next", ["\nQ:", "\n\n"], "The answer is 42.", True),
    ("aaab", ["aab"], "a", True),
    ("abab abc", ["abc"], "abab ", True),
    ("xyz", ["xyz"], "", True),
    ("xyz", ["x", "y", "z"], "", True),
    ("caféé done", ["é d"], "café", True),
    ("no stop here", ["here!", "no stop here?"], "no stop here", False),
]


def splits(text: str) -> list[list[str]]:
    """The text whole, one character at a time, and cut at every single position."""
    return [[text], list(text)] + [[text[:cut], text[cut:]] for cut in range(1, len(text))]


@pytest.mark.parametrize(("text", "stops", "expected", "stopped"), TEXTS)
def test_stop_scanner_output_does_not_depend_on_the_pieces(
    text: str, stops: list[str] | None, expected: str, stopped: bool
) -> None:
    for pieces in splits(text):
        emitted, flushed, hit = scan(pieces, stops)
        assert "".join(emitted) + flushed == expected, pieces
        assert hit is stopped, pieces
        # Nothing past the stop sequence's start ever came out, not even for a moment.
        assert all(expected.startswith("".join(emitted[: n + 1])) for n in range(len(emitted)))
