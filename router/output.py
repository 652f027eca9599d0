"""Turns one shard Generation into the events of its entry: token text from the incremental
detokenizer, the stop-sequence check, and the final text when the request ends.

The shard stops a request on max_new_tokens and EOS (it reports `generated_text`); stop
sequences are text, so they are matched here.
"""

from __future__ import annotations

import math

from router.detokenizer import IncrementalDetokenizer
from router.entry import EndEvent, Entry, PrefillEvent, Token, TokenEvent
from router.stopping import StopSequenceMatcher
from router.tokenizer import Tokenizer

FINISH_REASONS = {0: "length", 1: "eos_token", 2: "stop_sequence"}


def is_sampling(s) -> bool:
    """As the shard decides: do_sample, or any warper, means the token is drawn at random."""
    return (
        s.do_sample
        or s.temperature not in (0.0, 1.0)
        or s.top_k > 0
        or 0 < s.top_p < 1
        or 0 < s.typical_p < 1
    )


def _logprob(value: float) -> float | None:
    return None if math.isnan(value) else value


class OutputState:
    def __init__(self, tokenizer: Tokenizer, entry: Entry):
        self.tokenizer = tokenizer
        self.detokenizer = IncrementalDetokenizer(tokenizer, entry.request.input_ids)
        self.stops = StopSequenceMatcher(entry.request.stopping.stop_sequences)

    def token(self, token_id: int, logprob: float, text: str | None = None) -> Token:
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return Token(token_id, text, _logprob(logprob), self.tokenizer.is_special(token_id))

    def top_tokens(self, g) -> list[Token]:
        if not len(g.top_tokens):
            return []
        top = g.top_tokens[0]
        return [self.token(i, lp) for i, lp in zip(top.ids, top.logprobs)]

    def prefill_event(self, g) -> PrefillEvent | None:
        if not len(g.prefill_tokens.ids):
            return None
        return PrefillEvent(
            [self.token(i, lp) for i, lp in zip(g.prefill_tokens.ids, g.prefill_tokens.logprobs)]
        )

    def process(self, entry: Entry, g) -> list:
        """The events of one generation; the last one is an EndEvent when the entry finished."""
        events = []
        if entry.request.decoder_input_details and not entry.generated_ids:
            prefill = self.prefill_event(g)
            if prefill is not None:
                events.append(prefill)
        token_id, logprob = g.tokens.ids[0], g.tokens.logprobs[0]
        entry.generated_ids.append(token_id)
        token = self.token(token_id, logprob, self.detokenizer.step(token_id))
        top = self.top_tokens(g)
        finish = (
            FINISH_REASONS[g.generated_text.finish_reason] if g.HasField("generated_text") else None
        )
        if finish is None and self.stops.push(token.text) is not None:
            finish = "stop_sequence"
        if finish is None and len(entry.generated_ids) >= entry.request.stopping.max_new_tokens:
            finish = "length"  # the shard normally says so itself
        if finish is None:
            events.append(TokenEvent(token, top))
            return events
        seed = entry.request.sampling.seed if is_sampling(entry.request.sampling) else None
        text = self.tokenizer.decode(entry.generated_ids, skip_special_tokens=True)
        events.append(
            EndEvent(
                token,
                top,
                text,
                finish,
                len(entry.generated_ids),
                seed,
                entry.queued_at,
                entry.started_at or entry.queued_at,
                tuple(entry.generated_ids),
            )
        )
        return events
