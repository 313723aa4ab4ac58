"""Stop sequences in generated text (pure: no model, no threads)."""

from __future__ import annotations

from collections.abc import Sequence


class StopScanner:
    """Stop sequences in text that arrives in pieces (pure: no model, no threads).

    `feed` answers the part of the text so far that is safe to emit: everything before the first
    stop sequence to complete (then `stopped` is True and the rest is dropped), less the tail that
    could still be the start of one, which is held back until the next piece settles it. `flush`
    answers that tail once the text has ended. The emitted text does not depend on how the text
    was cut into pieces.
    """

    def __init__(self, stops: Sequence[str] | None) -> None:
        self._stops = [stop for stop in stops or [] if stop]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        buffer = self._held + text
        cut = _first_stop(buffer, self._stops)
        if cut is not None:
            self.stopped, self._held = True, ""
            return buffer[:cut]
        keep = _open_stop_length(buffer, self._stops)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the stop sequence that completes first in text starts (the longest on a tie)."""
    found = [(at + len(stop), at) for stop in stops if (at := text.find(stop)) >= 0]
    return min(found)[1] if found else None


def _open_stop_length(text: str, stops: Sequence[str]) -> int:
    """Length of text's longest tail that is the start (not all) of some stop sequence."""
    longest = min(len(text), max((len(stop) - 1 for stop in stops), default=0))
    for size in range(longest, 0, -1):
        if any(stop.startswith(text[-size:]) for stop in stops):
            return size
    return 0
