"""Incremental detokenization for streamed token text (TGI/transformers prefix and read offsets).

Each step decodes two short windows of ids:

    ids:  ... | prefix_offset ......... read_offset ......... end |
    prefix_text = decode(ids[prefix_offset:read_offset])   (already emitted, kept as context)
    new_text    = decode(ids[prefix_offset:end])

and emits `new_text[len(prefix_text):]` when `new_text` is longer and does not end with the
replacement character "\ufffd"; then prefix_offset = read_offset and read_offset = end.
Otherwise it emits "" and waits: the pending ids hold part of a multi-byte character.

The first window starts with the last 5 prompt ids, so the first generated token decodes with
its leading space; they are left out when the prompt ends inside a character, so that the
stream still equals the decoded generation. The window is bounded, so a step costs O(1): ids
before prefix_offset are dropped, and after MAX_PENDING_TOKENS undecodable ids in a row (a
model emitting U+FFFD or invalid bytes) the text is emitted as it stands.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

PROMPT_CONTEXT_TOKENS = 5  # TGI: prefix_offset = len(prompt) - 5, read_offset = len(prompt)
MAX_PENDING_TOKENS = 16  # a UTF-8 character is at most 4 bytes, hence at most 4 tokens


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns generated ids, one at a time, into the text each one adds.

    The concatenation of every `step` output equals
    `tokenizer.decode(generated_ids, skip_special_tokens=...)` for byte-level tokenizers, once
    no incomplete character is pending (the final text is decoded whole anyway).
    """

    def __init__(
        self, tokenizer: Decoder, prompt_ids: Sequence[int], skip_special_tokens: bool = False
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # the window ids[prefix_offset:]; the ids before it are dropped, so prefix_offset is 0
        self._window = list(prompt_ids[max(0, len(prompt_ids) - PROMPT_CONTEXT_TOKENS) :])
        self._prefix_text: str | None = self._decode(self._window)  # None: not decoded yet
        if self._prefix_text.endswith("\ufffd"):  # the prompt ends inside a character
            self._window, self._prefix_text = [], ""
        self._read_offset = len(self._window)

    def step(self, token_id: int) -> str:
        """Appends one id; returns the text it completes ("" while a character is partial)."""
        self._window.append(token_id)
        return self._emit(force=self.num_pending >= MAX_PENDING_TOKENS)

    @property
    def num_pending(self) -> int:
        """Ids appended but not yet turned into text."""
        return len(self._window) - self._read_offset

    def _emit(self, force: bool) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._window[: self._read_offset])
        prefix_text, new_text = self._prefix_text, self._decode(self._window)
        complete = len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd")
        if not (complete or force):
            return ""
        del self._window[: self._read_offset]  # prefix_offset = read_offset, read_offset = end
        self._read_offset, self._prefix_text = len(self._window), None
        return new_text[len(prefix_text) :]

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
