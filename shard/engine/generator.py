"""One generation step over a batch: schedule tokens, run the forward, choose next tokens,
update every request and report what each produced.

The shard stops a request on `max_new_tokens`, on EOS (unless ignore_eos) and when its grammar
is complete (as EOS); stop sequences are text and belong to the router. A stopped request stays
in the batch, computing nothing, until the router filters it out.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from shard.engine.batch import Batch, RequestState
from shard.engine.forward_context import AttentionMetadata
from shard.engine.model_runner import ModelRunner
from shard.sampling.grammar import GrammarCompiler
from shard.sampling.sampler import sample
from shard.sampling.watermark import Watermark

log = logging.getLogger(__name__)

FINISH_LENGTH, FINISH_EOS = 0, 1  # proto FinishReason values


@dataclass
class Generation:
    request_id: int
    token_id: int
    logprob: float
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    prefill_ids: list[int] | None = None
    prefill_logprobs: list[float] | None = None
    finish_reason: int | None = None  # set when the request stopped on this token
    generated_tokens: int = 0
    seed: int | None = None


@dataclass
class StepTimings:
    forward_ns: int = 0
    decode_ns: int = 0
    prefill_tokens: int = 0  # prompt tokens the forward computed
    decode_tokens: int = 0  # requests it computed one generated token for


@dataclass
class StepPlan:
    """The flat inputs of one forward and where each request's rows are."""

    active: list[RequestState]
    input_ids: list[int]
    positions: list[int]
    meta: AttentionMetadata
    logit_rows: list[int]
    prompt_rows: dict[int, tuple[int, int]]  # request index in active -> logits row span
    sample_rows: list[tuple[int, int]]  # (request index in active, logits row)


def plan_step(requests: list[RequestState], block_size: int, device) -> StepPlan:
    active = [r for r in requests if r.scheduled > 0]
    ids, positions, slots, logit_rows = [], [], [], []
    prompt_rows, sample_rows = {}, []
    for i, r in enumerate(active):
        start, end = r.cache_len, r.cache_len + r.scheduled
        first_row = len(ids)
        ids += r.token_ids[start:end]
        positions += range(start, end)
        slots += r.slots_for(start, end)
        if r.prefill_logprobs and start < r.num_prompt_tokens:
            prompt_rows[i] = (len(logit_rows), len(logit_rows) + r.scheduled)
            logit_rows += range(first_row, len(ids))
            if end == len(r.token_ids):
                sample_rows.append((i, len(logit_rows) - 1))
        elif end == len(r.token_ids):  # the last known token: it yields the next one
            sample_rows.append((i, len(logit_rows)))
            logit_rows.append(len(ids) - 1)
    meta = AttentionMetadata.build(
        [r.scheduled for r in active],
        [r.cache_len + r.scheduled for r in active],
        [r.blocks for r in active],
        slots,
        block_size,
        device,
    )
    return StepPlan(active, ids, positions, meta, logit_rows, prompt_rows, sample_rows)


def record_prompt_logprobs(plan: StepPlan, logprobs: torch.Tensor) -> None:
    """Row j of a chunk predicts prompt token j + 1: keep its logprob."""
    for i, (lo, hi) in plan.prompt_rows.items():
        r = plan.active[i]
        start = r.cache_len
        next_tokens = r.token_ids[start + 1 : start + 1 + (hi - lo)]
        n = min(len(next_tokens), r.num_prompt_tokens - start - 1)
        if n > 0:
            rows = logprobs[lo : lo + n]
            targets = torch.tensor(next_tokens[:n], device=rows.device)  # [n]
            picked = rows.gather(1, targets.unsqueeze(1)).squeeze(1)
            r.prompt_logprobs += picked.tolist()


class Generator:
    def __init__(
        self,
        runner: ModelRunner,
        eos_token_ids: tuple[int, ...],
        max_prefill_tokens: int,
        watermark: Watermark | None = None,
        grammars: GrammarCompiler | None = None,
    ):
        self.runner = runner
        self.eos_token_ids = set(eos_token_ids)
        self.max_prefill_tokens = max_prefill_tokens
        self.watermark = watermark or Watermark()  # gamma/delta for requests that ask for it
        self.grammars = grammars  # compiles requests' grammars (None: no tokenizer.json)

    def step(
        self, batch: Batch, prefill_budget: int | None = None
    ) -> tuple[list[Generation], StepTimings]:
        """One forward. `prefill_budget` (the router's, so that every rank plans the same
        step) re-plans the prompt tokens it computes; None keeps the plan of the last step."""
        timings = StepTimings()
        start = time.perf_counter_ns()
        if prefill_budget is not None:
            self._schedule(batch, prefill_budget)
        plan = plan_step(batch.requests, self.runner.block_size, self.runner.device)
        if not plan.active:
            return [], timings
        timings.prefill_tokens = sum(r.scheduled for r in plan.active if r.is_prefilling)
        timings.decode_tokens = sum(1 for r in plan.active if not r.is_prefilling)
        logits = self.runner.forward(plan.input_ids, plan.positions, plan.meta, plan.logit_rows)
        timings.forward_ns = time.perf_counter_ns() - start
        start = time.perf_counter_ns()
        if plan.prompt_rows:
            record_prompt_logprobs(plan, torch.log_softmax(logits, dim=-1))
        generations = self._choose_tokens(plan, logits)
        for r in plan.active:
            r.cache_len += r.scheduled
        self._schedule_next(batch)
        timings.decode_ns = time.perf_counter_ns() - start
        return generations, timings

    def _choose_tokens(self, plan: StepPlan, logits: torch.Tensor) -> list[Generation]:
        if not plan.sample_rows:
            return []
        chosen = [plan.active[i] for i, _ in plan.sample_rows]
        rows = torch.tensor(
            [row for _, row in plan.sample_rows], dtype=torch.int64, device=logits.device
        )
        top_n = max(r.top_n_tokens for r in chosen)
        histories = [r.token_ids for r in chosen]
        scores = logits[rows]  # a copy: the grammars mask their own rows of it
        for k, r in enumerate(chosen):
            if r.grammar is not None:
                r.grammar.mask(scores[k])
        out = sample(scores, [r.sampler for r in chosen], histories, top_n, self.watermark)
        next_ids, logprobs = out.next_ids.tolist(), out.logprobs.tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        generations = []
        for k, r in enumerate(chosen):
            g = self._append_token(r, next_ids[k], logprobs[k])
            if top_ids is not None and r.top_n_tokens:
                g.top_ids, g.top_logprobs = (
                    top_ids[k][: r.top_n_tokens],
                    top_lps[k][: r.top_n_tokens],
                )
            generations.append(g)
        return generations

    def _append_token(self, r: RequestState, token_id: int, logprob: float) -> Generation:
        g = Generation(r.id, token_id, logprob)
        if r.num_generated == 0 and r.prefill_logprobs:
            g.prefill_ids = r.token_ids[: r.num_prompt_tokens]
            g.prefill_logprobs = (r.prompt_logprobs + [math.nan] * r.num_prompt_tokens)[
                : r.num_prompt_tokens
            ]
        r.token_ids.append(token_id)
        if r.num_generated >= r.max_new_tokens:
            g.finish_reason = FINISH_LENGTH
        elif token_id in self.eos_token_ids and not r.ignore_eos:
            g.finish_reason = FINISH_EOS
        if r.grammar is not None and r.grammar.accept(token_id) and g.finish_reason is None:
            if r.grammar.error:  # llguidance's limits, say: end it rather than go on unmasked
                log.warning("request %d: its grammar failed: %s", r.id, r.grammar.error)
            g.finish_reason = FINISH_EOS  # the grammar is complete: nothing else may follow
        if g.finish_reason is not None:
            r.stopped = True
            g.generated_tokens = r.num_generated
            g.seed = None if r.sampler.params.is_greedy else r.sampler.params.seed
        return g

    def _schedule_next(self, batch: Batch) -> None:
        """Decoding requests take one token each; prompts share what is left of the prefill
        budget, oldest first."""
        decoding = sum(1 for r in batch.requests if not r.stopped and not r.is_prefilling)
        self._schedule(batch, max(self.max_prefill_tokens - decoding, 1))

    @staticmethod
    def _schedule(batch: Batch, budget: int) -> None:
        """Decoding requests take one token each; prompts share `budget`, oldest first."""
        for r in batch.requests:
            if r.is_prefilling and not r.stopped:
                budget -= r.schedule_after_step(budget)
            else:
                r.schedule_after_step(0)
