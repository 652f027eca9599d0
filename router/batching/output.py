"""Turns the shards' generations for one request into its events: token text from the
incremental detokenizer, the stop-sequence check, and the final text when the request ends.

The shard stops a request on max_new_tokens and EOS (it reports a finish reason); stop
sequences are text, so they are matched here. One OutputState lives as long as the request,
across the 1024-token chunks of a long generation (`next_chunk`), so a stop sequence split
over a chunk boundary is still found.
"""

from __future__ import annotations

import math

from router.batching.events import EndEvent, Event, PrefillEvent, Token, TokenEvent
from router.batching.shard_client import Generation
from router.request import SamplingParameters, ValidatedRequest
from router.text.detokenizer import IncrementalDetokenizer
from router.text.stopping import StopSequenceMatcher, StopTrimmer
from router.text.tokenizer import Tokenizer


def is_sampling(s: SamplingParameters) -> bool:
    """As the shard decides: do_sample, or any warper, means the token is drawn at random."""
    return (
        s.do_sample
        or s.temperature not in (0.0, 1.0)
        or s.top_k > 0
        or 0 < s.top_p < 1
        or 0 < s.typical_p < 1
    )


def finite_or_none(value: float) -> float | None:
    """A logprob for JSON: NaN (unknown) and -inf (impossible) become None, as serde does."""
    return value if math.isfinite(value) else None


class OutputState:
    def __init__(self, tokenizer: Tokenizer, request: ValidatedRequest):
        self.tokenizer = tokenizer
        self.request = request
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.input_ids)
        self.stops = StopSequenceMatcher(request.stopping.stop_sequences)
        self.trimmer = StopTrimmer(self.stops)
        self.generated_ids: list[int] = []  # of the current chunk

    def next_chunk(self, request: ValidatedRequest) -> OutputState:
        """The same output continued by the next chunk of a long generation."""
        self.request = request
        self.generated_ids = []
        return self

    def flush(self) -> str:
        """Visible text still held back as a possible stop sequence start (the output ended)."""
        return self.trimmer.flush()

    def token(self, token_id: int, logprob: float, text: str | None = None) -> Token:
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return Token(token_id, text, finite_or_none(logprob), self.tokenizer.is_special(token_id))

    def process(self, g: Generation, queued_at: float, started_at: float) -> list[Event]:
        """The events of one generation; the last one is an EndEvent when the request ends."""
        events: list[Event] = []
        if g.prefill and not self.generated_ids:
            events.append(PrefillEvent([self.token(i, lp) for i, lp in g.prefill]))
        self.generated_ids.append(g.token_id)
        token = self.token(g.token_id, g.logprob, self.detokenizer.step(g.token_id))
        top = [self.token(i, lp) for i, lp in g.top_tokens]
        finish = g.finish_reason
        if finish is None and self.stops.push(token.text) is not None:
            finish = "stop_sequence"
        elif finish is not None:
            self.stops.push(token.text)
        content = self.trimmer.push(token.text, visible=not token.special)
        if finish is None and len(self.generated_ids) >= self.request.stopping.max_new_tokens:
            finish = "length"  # the shard normally says so itself
        if finish is None:
            events.append(TokenEvent(token, top, content))
            return events
        if finish == "eos_token":
            content += self.trimmer.flush()
        events.append(self._end(token, top, finish, content, queued_at, started_at))
        return events

    def _end(
        self,
        token: Token,
        top: list[Token],
        finish: str,
        content: str,
        queued_at: float,
        started_at: float,
    ) -> EndEvent:
        sampling = self.request.sampling
        return EndEvent(
            token=token,
            top_tokens=top,
            generated_text=self.tokenizer.decode(self.generated_ids, skip_special_tokens=True),
            finish_reason=finish,
            generated_tokens=len(self.generated_ids),
            seed=sampling.seed if is_sampling(sampling) else None,
            queued_at=queued_at,
            started_at=started_at,
            generated_ids=tuple(self.generated_ids),
            content=content,
        )
