"""A running batch on the shard: the requests the router sent, each with its tokens, its place
in the paged KV cache and how far its computation has come.

Progress is counted in tokens (design decision 4):
  num_prompt_tokens    prompt length
  cache_len            tokens whose K/V is in the cache (num_computed_tokens)
  scheduled            tokens the next forward computes (num_scheduled_tokens): a prompt chunk
                       while prefilling, 1 while decoding, 0 when stopped or waiting for budget
Batches are plain lists of requests, so filter and concatenate are list operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from common.grammar import GRAMMAR_NONE, GrammarError
from shard.sampling.grammar import GrammarCompiler, GrammarState
from shard.sampling.sampler import RequestSampler, SamplingParams


class InvalidRequest(ValueError):
    """The router sent something the shard cannot serve (bad ids, blocks or lengths)."""


@dataclass
class RequestState:
    id: int
    token_ids: list[int]  # prompt, then every generated token
    num_prompt_tokens: int
    blocks: list[int]  # block table: block ids in position order
    slots: list[int]  # slot of each position (empty: derived from blocks)
    cache_len: int
    scheduled: int
    sampler: RequestSampler
    max_new_tokens: int
    ignore_eos: bool = False
    prefill_logprobs: bool = False
    top_n_tokens: int = 0
    stopped: bool = False
    block_size: int = 16
    # Logprob of each prompt token, gathered chunk by chunk when prefill_logprobs is set.
    prompt_logprobs: list[float] = field(default_factory=list)
    grammar: GrammarState | None = None  # what the request's tokens must follow, if anything

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.cache_len < self.num_prompt_tokens

    @property
    def capacity(self) -> int:
        """Positions this request may occupy in the cache."""
        return len(self.slots) if self.slots else len(self.blocks) * self.block_size

    def slots_for(self, start: int, end: int) -> list[int]:
        """Cache slots of positions [start, end)."""
        if end > self.capacity:
            raise InvalidRequest(
                f"request {self.id} needs {end} KV slots but was given {self.capacity}"
            )
        if self.slots:
            return self.slots[start:end]
        bs = self.block_size
        return [self.blocks[p // bs] * bs + p % bs for p in range(start, end)]

    def schedule_after_step(self, prefill_budget: int) -> int:
        """Sets and returns how many tokens the next forward computes for this request."""
        if self.stopped:
            self.scheduled = 0
        elif self.is_prefilling:
            self.scheduled = max(0, min(self.num_prompt_tokens - self.cache_len, prefill_budget))
        else:
            self.scheduled = 1
        return self.scheduled


def request_from_pb(
    pb, block_size: int, num_blocks: int, vocab_size: int, grammars: GrammarCompiler | None = None
) -> RequestState:
    """Validates one proto Request and builds its state (its grammar compiled by `grammars`)."""
    ids = list(pb.input_ids)
    if not ids:
        raise InvalidRequest(f"request {pb.id} has no input_ids")
    if max(ids) >= vocab_size:
        raise InvalidRequest(f"request {pb.id}: token id {max(ids)} >= vocab size {vocab_size}")
    if pb.cache_len >= len(ids):
        raise InvalidRequest(
            f"request {pb.id}: cache_len {pb.cache_len} >= prompt length {len(ids)}"
        )
    blocks = list(pb.blocks)
    if blocks and (max(blocks) >= num_blocks):
        raise InvalidRequest(f"request {pb.id}: block {max(blocks)} >= num_blocks {num_blocks}")
    slots = list(pb.slots)
    if slots and max(slots) >= num_blocks * block_size:
        raise InvalidRequest(f"request {pb.id}: slot {max(slots)} is outside the cache")
    remaining = len(ids) - pb.cache_len
    chunk = pb.chunk_len if pb.HasField("chunk_len") and pb.chunk_len > 0 else remaining
    state = RequestState(
        id=pb.id,
        token_ids=ids,
        num_prompt_tokens=len(ids),
        blocks=blocks,
        slots=slots,
        cache_len=pb.cache_len,
        scheduled=min(chunk, remaining),
        sampler=RequestSampler(SamplingParams.from_proto(pb.parameters)),
        max_new_tokens=pb.stopping_parameters.max_new_tokens,
        ignore_eos=pb.stopping_parameters.ignore_eos_token,
        prefill_logprobs=pb.prefill_logprobs,
        top_n_tokens=pb.top_n_tokens,
        block_size=block_size,
        prompt_logprobs=[math.nan] * (pb.cache_len + 1) if pb.prefill_logprobs else [],
        grammar=_grammar(pb, grammars),
    )
    state.slots_for(0, len(ids))  # fails now, not mid-batch, if the prompt does not fit
    return state


def _grammar(pb, grammars: GrammarCompiler | None) -> GrammarState | None:
    kind = pb.parameters.grammar_type
    if kind == GRAMMAR_NONE:
        return None
    if grammars is None:
        raise InvalidRequest(f"request {pb.id}: this shard has no tokenizer.json for grammars")
    try:
        return grammars.state(kind, pb.parameters.grammar)
    except GrammarError as err:
        raise InvalidRequest(f"request {pb.id}: grammar does not compile: {err}") from err


class Batch:
    def __init__(self, batch_id: int, requests: list[RequestState], block_size: int):
        self.id = batch_id
        self.requests = requests
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def request_ids(self) -> list[int]:
        return [r.id for r in self.requests]

    @property
    def current_tokens(self) -> int:
        """Tokens the next forward computes."""
        return sum(r.scheduled for r in self.requests)

    @property
    def max_tokens(self) -> int:
        """Tokens this batch may grow to: its requests' KV capacity."""
        return sum(r.capacity for r in self.requests)

    @property
    def all_stopped(self) -> bool:
        return all(r.stopped for r in self.requests)

    def filter(self, keep_ids: list[int]) -> "Batch":
        keep = set(keep_ids)
        unknown = keep - set(self.request_ids)
        if unknown:
            raise InvalidRequest(f"batch {self.id} has no request {sorted(unknown)}")
        self.requests = [r for r in self.requests if r.id in keep]
        return self

    @classmethod
    def concatenate(cls, batches: list["Batch"]) -> "Batch":
        """Merges batches into the first one's id, keeping request order."""
        requests = [r for b in batches for r in b.requests]
        return cls(batches[0].id, requests, batches[0].block_size)
