"""How many prompt tokens may join a step while other requests are decoding.

A step that computes a chunk of a prompt beside the running requests' next tokens lasts longer
than a decode step, and every running stream waits that long for its token. With no budget of
its own, a 2,000-token prompt would make them wait for a whole prefill: on a 2-core CPU ~60
times their time per token. So while requests decode, the prompt chunks of a step are cut to
what keeps the step within STALL_FACTOR decode steps; with nothing decoding, prompts get the
whole `--max-batch-prefill-tokens` (their TTFT is all that matters then).

The cost model is measured, not configured, since it varies by an order of magnitude between a
laptop and a GPU: a step lasts `decode_step + token_cost * prompt_tokens`, where `decode_step`
is a moving average of recent decode-only steps and `token_cost` what a prompt token added to
recent steps. That cost grows with the context a chunk attends to, and on a shared CPU it
varies by half from one step to the next, so the budget takes the largest of the last
COST_WINDOW measurements: one step that happened to be fast does not make the next chunk too
big, and a growing cost is followed at once. Until both are known the budget is MIN_CHUNK, so
the first guess errs on the side of the streams. This runs in the router, once for every rank:
ranks must plan identical steps.
"""

from __future__ import annotations

from collections import deque

STALL_FACTOR = 2.0  # a step with prompt chunks may last this many decode steps (the bound is 3)
MIN_CHUNK = 16  # prompt tokens a step may always take: a long prompt always progresses
COST_WINDOW = 4  # steps with prompt tokens whose cost per token is remembered
SMOOTHING = 0.3  # weight of the newest decode step in its moving average


class PrefillPacer:
    def __init__(self, max_prefill_tokens: int):
        self.max_prefill_tokens = max_prefill_tokens
        self.decode_step: float | None = None  # seconds of a decode-only step
        self.token_costs: deque[float] = deque(maxlen=COST_WINDOW)  # seconds per prompt token

    def observe(self, decode_tokens: int, prefill_tokens: int, seconds: float) -> None:
        """One step's wall time and what it computed."""
        if prefill_tokens == 0:
            if decode_tokens > 0:
                old = self.decode_step
                self.decode_step = seconds if old is None else old + SMOOTHING * (seconds - old)
            return
        if self.decode_step is not None:  # a step's fixed cost is about a decode step's
            self.token_costs.append(max(seconds - self.decode_step, 0.0) / prefill_tokens)

    def budget(self, decoding: int) -> int:
        """Prompt tokens the next step may compute beside `decoding` decoding requests."""
        if decoding == 0:
            return self.max_prefill_tokens
        cost = max(self.token_costs, default=0.0)
        if self.decode_step is None or cost == 0.0:
            return min(MIN_CHUNK, self.max_prefill_tokens)
        tokens = int((STALL_FACTOR - 1) * self.decode_step / cost)
        return max(MIN_CHUNK, min(tokens, self.max_prefill_tokens))
