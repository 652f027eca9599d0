"""Stop sequences, matched on the streamed text in linear time.

TGI runs the regex `re.escape(s)$` over a rolling buffer of the last 300 characters after every
token, so it finds a stop sequence only when a token's text ends exactly with it, and never one
longer than 300 characters. Here each stop sequence has a streaming KMP matcher whose state is
the length of the longest prefix of the stop that ends the output so far. Consequences:

- a stop sequence is found wherever it ends: split across tokens, or in the middle of a token's
  text (then `match.end < len(text)`);
- the earliest match wins; two stops ending at the same character go by their order;
- work is linear in the text pushed, whatever the length of the stop sequences: no buffer is
  searched again, an unrelated token costs one `str.find`, text that continues a partial match
  is compared at C speed, and KMP's failure table is built lazily, only as far as a partial
  match has reached (never more than the text pushed so far);
- a matcher reports one match; later pushes return None. Empty stop sequences are ignored.

Like TGI, the TGI routes keep the whole text of the token that completed the stop sequence (the
final `generated_text` includes the stop sequence and whatever followed it in that token). The
OpenAI routes leave the stop sequence out, as OpenAI, vLLM and llama.cpp do: `StopTrimmer` holds
back the text that may still turn out to be the start of a stop sequence (`partial` characters)
and releases the rest, so a stream never shows a piece of the stop text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple


class StopMatch(NamedTuple):
    stop: str  # the stop sequence found
    end: int  # index just past it in the text of the push that completed it
    offset: int  # index just past it in all the text pushed so far


class StopSequenceMatcher:
    """Feeds streamed text to one matcher per stop sequence; reports the first match."""

    def __init__(self, stop_sequences: Iterable[str]):
        self._matchers = [_KmpMatcher(s) for s in dict.fromkeys(stop_sequences) if s]
        self.num_chars = 0  # characters pushed so far
        self.match: StopMatch | None = None

    @property
    def matched(self) -> str | None:
        return self.match.stop if self.match else None

    @property
    def partial(self) -> int:
        """Characters at the end of the text so far that begin some stop sequence (0 once one
        matched): they cannot be shown yet when stop sequences are cut out."""
        if self.match is not None:
            return 0
        return max((m.state for m in self._matchers), default=0)

    def push(self, text: str) -> str | None:
        """Appends newly generated text; returns the stop sequence it completes, if any."""
        if self.match is not None or not self._matchers:
            self.num_chars += len(text)
            return None
        best: tuple[int, str] | None = None
        for matcher in self._matchers:
            end = matcher.feed(text)
            if end >= 0 and (best is None or end < best[0]):
                best = (end, matcher.stop)
        if best is not None:
            self.match = StopMatch(best[1], best[0], self.num_chars + best[0])
        self.num_chars += len(text)
        return self.matched


class _KmpMatcher:
    """Streaming Knuth-Morris-Pratt matcher for one pattern."""

    def __init__(self, stop: str):
        self.stop = stop
        self.state = 0  # length of the longest prefix of `stop` that ends the text fed so far
        self._failure: list[int] = []  # KMP prefix function of `stop`, computed on demand

    def feed(self, text: str) -> int:
        """Consumes `text`; returns the index just past the first complete match, or -1."""
        stop, m, n = self.stop, len(self.stop), len(text)
        i = 0
        compared_until = 0  # fast comparisons never overlap: O(len(text)) in all
        while i < n:
            if self.state == 0 and (i := text.find(stop[0], i)) < 0:
                return -1
            if i >= compared_until:
                count = min(n - i, m - self.state)
                if text.startswith(stop[self.state : self.state + count], i):
                    self.state += count
                    return self._found(i + count) if self.state == m else -1
                compared_until = i + count
            self._step(text[i])
            i += 1
            if self.state == m:
                return self._found(i)
        return -1

    def _found(self, end: int) -> int:
        """Starts afresh after a complete match (StopSequenceMatcher stops at the first)."""
        self.state = 0
        return end

    def _step(self, char: str) -> None:
        """One KMP transition."""
        state, stop = self.state, self.stop
        while state > 0 and stop[state] != char:
            state = self._prefix(state - 1)
        self.state = state + 1 if stop[state] == char else 0

    def _prefix(self, j: int) -> int:
        """Length of the longest proper border of stop[:j + 1]; extends the table to j."""
        failure, stop = self._failure, self.stop
        if not failure:
            failure.append(0)
        k = failure[-1]
        for q in range(len(failure), j + 1):
            while k > 0 and stop[q] != stop[k]:
                k = failure[k - 1]
            if stop[q] == stop[k]:
                k += 1
            failure.append(k)
        return failure[j]


class StopTrimmer:
    """The visible text of a stream with its stop sequence cut out (OpenAI's semantics).

    `push` takes each piece of text after the matcher has seen it, with whether it is visible
    (a special token's text is matched but never shown), and returns what can be shown now:
    everything but a possible start of a stop sequence, or, once one matched, everything
    before it. `flush` releases what is still held when the output ends another way.
    """

    def __init__(self, matcher: StopSequenceMatcher):
        self.matcher = matcher
        self._held: list[tuple[str, bool]] = []  # (text, visible), pushed but not released
        self._held_chars = 0
        self._done = False

    def push(self, text: str, visible: bool = True) -> str:
        if self._done:
            return ""
        self._held.append((text, visible))
        self._held_chars += len(text)
        match = self.matcher.match
        if match is None:
            return self._release(self._held_chars - min(self.matcher.partial, self._held_chars))
        held_from = self.matcher.num_chars - self._held_chars  # offset of the first held char
        stop_start = match.offset - len(match.stop)
        self._done = True
        return self._release(max(stop_start - held_from, 0))

    def flush(self) -> str:
        return "" if self._done else self._release(self._held_chars)

    def _release(self, chars: int) -> str:
        """The visible part of the first `chars` held characters, which leave the buffer."""
        out = []
        while chars > 0 and self._held:
            text, visible = self._held[0]
            take = min(chars, len(text))
            if visible:
                out.append(text[:take])
            if take == len(text):
                self._held.pop(0)
            else:
                self._held[0] = (text[take:], visible)
            chars -= take
            self._held_chars -= take
        return "".join(out)
