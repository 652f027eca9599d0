"""A shard client that needs no model: it keeps batches like the real shard and 'generates'
a deterministic token per step, so the router's loop can be tested exactly.

Every token has logprob -0.5, or with `seeded_logprobs` set, a value that depends on the
seed of a sampling request (so best_of's choice can be checked)."""

from __future__ import annotations

import asyncio

from router.batching.shard_client import (
    CachedBatch,
    Generation,
    NewRequest,
    ShardError,
    ShardInfo,
    StepResult,
    request_to_pb,
)


def seed_logprob(seed: int) -> float:
    """The logprob of every token of a sampling request with `seed` (seeded_logprobs)."""
    return -((seed % 1000) + 1) / 1000


class FakeShardClient:
    def __init__(
        self,
        vocab: list[int],
        eos_id: int | None = None,
        support_chunking: bool = True,
        block_size: int = 4,
        num_blocks: int = 64,
        step_delay: float = 0.0,
        use_prefix_caching: bool = True,
        token_delay: float = 0.0,
    ):
        self.vocab = vocab  # token ids to emit, cycled per request
        self.eos_id = eos_id
        self.support_chunking = support_chunking
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.step_delay = step_delay
        self.token_delay = token_delay  # what each prompt token adds to a step
        self.steps: list[tuple[int, int]] = []  # (decode_tokens, prefill_tokens) of each step
        self.batches: dict[int, list[dict]] = {}
        self.calls: list[tuple] = []
        self.fail_next: str | None = None  # "prefill" or "decode": raise on the next such call
        self.seeded_logprobs = False  # sampling requests: logprob = seed_logprob(seed)
        self.requests: dict = {}  # every request prefilled, as the protobuf the shard gets
        self.use_prefix_caching = use_prefix_caching
        self.kv: dict[int, int] = {}  # slot -> the token id whose K/V it holds
        self.budgets: list[int] = []  # the prefill_budget of every step that had one

    async def info(self):
        return ShardInfo(
            self.block_size, self.support_chunking, 1, use_prefix_caching=self.use_prefix_caching
        )

    async def health(self, timeout=None):
        return None

    async def clear_cache(self, batch_id=None):
        self.calls.append(("clear", batch_id))
        if batch_id is None:
            self.batches.clear()
        else:
            self.batches.pop(batch_id, None)

    async def filter_batch(self, batch_id, request_ids):
        self.calls.append(("filter", batch_id, tuple(request_ids)))
        keep = set(request_ids)
        self.batches[batch_id] = [r for r in self.batches[batch_id] if r["id"] in keep]
        return self._cached(batch_id)

    async def liveness_prefill(self, token_id: int):
        self.calls.append(("liveness", token_id))
        if self.fail_next == "prefill":
            self.fail_next = None
            raise ShardError("injected prefill failure")

    async def prefill(
        self,
        batch_id: int,
        new: list[NewRequest],
        cached: CachedBatch | None,
        prefill_budget: int | None = None,
    ) -> StepResult:
        self.calls.append(
            ("prefill", batch_id, tuple(r.id for r in new), cached.id if cached else None)
        )
        if self.fail_next == "prefill":
            self.fail_next = None
            raise ShardError("injected prefill failure")
        self.requests.update((r.id, request_to_pb(r)) for r in new)
        requests = [self._state(r) for r in new]
        if cached is not None:
            requests = self.batches.pop(cached.id) + requests
        self.batches[batch_id] = requests
        return await self._step(batch_id, prefill_budget)

    async def decode(self, batches, prefill_budget: int | None = None):
        self.calls.append(("decode", tuple(b.id for b in batches)))
        if self.fail_next == "decode":
            self.fail_next = None
            raise ShardError("injected decode failure")
        merged = [r for b in batches for r in self.batches.pop(b.id)]
        self.batches[batches[0].id] = merged
        return await self._step(batches[0].id, prefill_budget)

    def _state(self, new: NewRequest) -> dict:
        r, allocation = new.request, new.allocation
        cache_len = allocation.cache_len
        chunk = new.chunk_len if new.chunk_len is not None else r.input_length - cache_len
        assert len(allocation.slots) >= r.input_length + r.stopping.max_new_tokens - 1
        assert 0 not in allocation.blocks, "block 0 is reserved"
        assert cache_len < r.input_length, "the last prompt token must be computed"
        for p in range(cache_len):  # the prefix cache handed out blocks that hold the prompt
            assert self.kv.get(allocation.slots[p]) == r.input_ids[p], f"stale KV at {p}"
        return {
            "id": new.id,
            "tokens": list(r.input_ids),
            "slots": allocation.slots,
            "prompt": r.input_length,
            "computed": cache_len,
            "next": chunk,
            "generated": 0,
            "max_new": r.stopping.max_new_tokens,
            "done": False,
            "blocks": list(allocation.blocks),
            "logprob": seed_logprob(r.sampling.seed)
            if self.seeded_logprobs and r.sampling.do_sample
            else -0.5,
        }

    async def _step(self, batch_id: int, prefill_budget: int | None = None) -> StepResult:
        if prefill_budget is not None:  # as the shard: prompts share the budget, oldest first
            self.budgets.append(prefill_budget)
            for r in self.batches[batch_id]:
                if not r["done"] and r["computed"] < r["prompt"]:
                    r["next"] = min(r["prompt"] - r["computed"], max(prefill_budget, 0))
                    prefill_budget -= r["next"]
        active = [r for r in self.batches[batch_id] if not r["done"] and r["next"] > 0]
        prefill_tokens = sum(r["next"] for r in active if r["computed"] < r["prompt"])
        decode_tokens = sum(1 for r in active if r["computed"] >= r["prompt"])
        self.steps.append((decode_tokens, prefill_tokens))
        if self.step_delay or self.token_delay:
            await asyncio.sleep(self.step_delay + self.token_delay * prefill_tokens)
        generations = []
        for r in active:
            for p in range(r["computed"], r["computed"] + r["next"]):
                self.kv[r["slots"][p]] = r["tokens"][p]
            r["computed"] += r["next"]
            if r["computed"] < r["prompt"]:
                r["next"] = r["prompt"] - r["computed"]  # the rest of the prompt next step
                continue
            generations.append(self.generation(r))
        cached = self._cached(batch_id)
        if cached is None:
            self.batches.pop(batch_id, None)
        return StepResult(
            tuple(generations), cached, prefill_tokens=prefill_tokens, decode_tokens=decode_tokens
        )

    def generation(self, r: dict) -> Generation:
        """The next token of request state `r` (subclasses add top tokens or prefill)."""
        token = self.vocab[(r["id"] + r["generated"]) % len(self.vocab)]
        r["tokens"].append(token)
        r["generated"] += 1
        r["next"] = 1
        finish = None
        if r["generated"] >= r["max_new"]:
            finish = "length"
        elif token == self.eos_id:
            finish = "eos_token"
        r["done"] = finish is not None
        return Generation(r["id"], token, r["logprob"], finish_reason=finish)

    def _cached(self, batch_id: int) -> CachedBatch | None:
        requests = self.batches.get(batch_id, [])
        if not requests or all(r["done"] for r in requests):
            return None
        return CachedBatch(
            id=batch_id,
            request_ids=tuple(r["id"] for r in requests),
            size=len(requests),
            max_tokens=sum(len(r["blocks"]) * self.block_size for r in requests),
            current_tokens=sum(0 if r["done"] else r["next"] for r in requests),
        )
