"""The shard's gRPC server, driven in-process with hand-built batches on a tiny random Llama."""

from __future__ import annotations

import math
import os
import random

import grpc
import pytest
import torch

from pb import generate_pb2 as pb
from tests.shard.harness import BlockAllocator, Params, ShardHarness, generate, make_request

BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def shard(tiny_llama_dir, tmp_path_factory):
    harness = ShardHarness(
        tiny_llama_dir,
        tmp_path_factory.mktemp("sock") / "shard",
        block_size=BLOCK_SIZE,
        kv_bytes=4 * 2**20,
    )
    response = harness.stub.Warmup(pb.WarmupRequest(max_prefill_tokens=256))
    harness.num_blocks = response.max_supported_total_tokens // BLOCK_SIZE
    yield harness
    harness.close()


@pytest.fixture
def alloc(shard):
    return BlockAllocator(shard.num_blocks, BLOCK_SIZE)


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 128) for _ in range(rng.randint(2, 40))] for _ in range(n)]


def test_info_and_discovery(shard):
    info = shard.stub.Info(pb.InfoRequest())
    assert (info.block_size, info.support_chunking, info.requires_padding) == (
        BLOCK_SIZE,
        True,
        False,
    )
    assert info.dtype == "float32" and info.device_type == "cpu"
    urls = shard.stub.ServiceDiscovery(pb.ServiceDiscoveryRequest()).urls
    assert list(urls) == [f"unix://{shard.config.uds_path}-0"]
    shard.stub.Health(pb.HealthRequest())
    assert os.stat(shard.config.socket_path).st_mode & 0o777 == 0o600  # only this user connects


def test_warmup_sizes_the_cache_from_the_budget(shard):
    bytes_per_block = shard.service.runner.bytes_per_block()
    assert shard.num_blocks == 4 * 2**20 // bytes_per_block
    assert shard.service.runner.num_blocks == shard.num_blocks


def test_greedy_alone_and_batched_match_transformers(shard, alloc, tiny_llama_hf):
    ps = prompts(6)
    expected = [hf_greedy(tiny_llama_hf, p, 10) for p in ps]
    for i, p in enumerate(ps):
        out = generate(
            shard.stub, [make_request(i, p, alloc, Params(max_new_tokens=10))], batch_id=i
        )
        assert out[i] == expected[i]
    alloc = BlockAllocator(shard.num_blocks, BLOCK_SIZE)
    lengths = [3, 10, 7, 10, 1, 5]  # requests finish at different steps and get filtered out
    batch = [
        make_request(100 + i, p, alloc, Params(max_new_tokens=n))
        for i, (p, n) in enumerate(zip(ps, lengths))
    ]
    out = generate(shard.stub, batch, batch_id=100)
    assert [out[100 + i] for i in range(6)] == [e[:n] for e, n in zip(expected, lengths)]
    assert len(shard.service.cache) == 0


def test_prefill_merges_into_running_batch_and_decode_merges_batches(shard, alloc, tiny_llama_hf):
    ps = prompts(3, seed=1)
    expected = [hf_greedy(tiny_llama_hf, p, 6) for p in ps]
    r0 = make_request(0, ps[0], alloc, Params(max_new_tokens=6))
    first = shard.stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[r0], size=1)))
    tokens = {0: list(first.generations[0].tokens.ids), 1: [], 2: []}
    # A new request joins the running batch: one forward computes its prompt and r0's next token.
    r1 = make_request(1, ps[1], alloc, Params(max_new_tokens=6))
    second = shard.stub.Prefill(
        pb.PrefillRequest(batch=pb.Batch(id=2, requests=[r1], size=1), cached_batch=first.batch)
    )
    for g in second.generations:
        tokens[g.request_id] += g.tokens.ids
    r2 = make_request(2, ps[2], alloc, Params(max_new_tokens=6))
    third = shard.stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=3, requests=[r2], size=1)))
    tokens[2] += third.generations[0].tokens.ids
    batches = [second.batch, third.batch]
    while batches:  # Decode over two cached batches merges them
        response = shard.stub.Decode(pb.DecodeRequest(batches=batches))
        for g in response.generations:
            tokens[g.request_id] += g.tokens.ids
        batches = [response.batch] if response.HasField("batch") else []
    assert [tokens[i] for i in range(3)] == expected
    assert len(shard.service.cache) == 0


def test_chunked_prefill_and_cached_prefix(shard, alloc, tiny_llama_hf):
    prompt = prompts(1, seed=2)[0] + list(range(10, 40))
    expected = hf_greedy(tiny_llama_hf, prompt, 5)
    # Chunked: only 7 tokens now; the shard computes the rest in later steps.
    out = generate(
        shard.stub, [make_request(0, prompt, alloc, Params(max_new_tokens=5), chunk_len=7)]
    )
    assert out[0] == expected
    # Prefix cache: request 1 writes the prompt; request 2 reuses its first 3 blocks (12 tokens).
    first = make_request(1, prompt, alloc, Params(max_new_tokens=1))
    generate(shard.stub, [first], batch_id=5)
    extra = alloc.allocate(len(prompt) + 5 - 12)[0]
    reuse = make_request(
        2,
        prompt,
        alloc,
        Params(max_new_tokens=5),
        cache_len=12,
        blocks=list(first.blocks[:3]) + extra,
    )
    assert generate(shard.stub, [reuse], batch_id=6)[2] == expected


def test_the_routers_prefill_budget_paces_a_prompt_beside_a_decoding_request(
    shard, alloc, tiny_llama_hf
):
    ps = prompts(2, seed=5)
    long = ps[1] + list(range(10, 40))
    expected = [hf_greedy(tiny_llama_hf, ps[0], 12), hf_greedy(tiny_llama_hf, long, 3)]
    r0 = make_request(0, ps[0], alloc, Params(max_new_tokens=12))
    first = shard.stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[r0], size=1)))
    assert (first.prefill_tokens, first.decode_tokens) == (len(ps[0]), 0)
    tokens = {0: list(first.generations[0].tokens.ids), 1: []}
    r1 = make_request(1, long, alloc, Params(max_new_tokens=3))
    response = shard.stub.Prefill(
        pb.PrefillRequest(
            batch=pb.Batch(id=2, requests=[r1], size=1), cached_batch=first.batch, prefill_budget=8
        )
    )
    steps = []
    while True:
        steps.append((response.decode_tokens, response.prefill_tokens))
        for g in response.generations:
            tokens[g.request_id] += g.tokens.ids
        if not response.HasField("batch"):
            break
        response = shard.stub.Decode(pb.DecodeRequest(batches=[response.batch], prefill_budget=8))
    chunks = [prefill for _, prefill in steps if prefill]
    assert chunks == [8] * (len(long) // 8) + [len(long) % 8] * (len(long) % 8 > 0)
    assert all(decode == 1 for decode, _ in steps[: len(chunks)])  # r0 decoded meanwhile
    assert [tokens[0], tokens[1]] == expected


def test_seeded_sampling_is_independent_of_the_batch(shard, alloc):
    ps = prompts(8, seed=3)
    sampled = Params(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, seed=1234)
    alone = generate(shard.stub, [make_request(0, ps[0], alloc, sampled)], batch_id=10)[0]
    alloc = BlockAllocator(shard.num_blocks, BLOCK_SIZE)
    others = [
        Params(max_new_tokens=12, do_sample=True, seed=7 + i, top_p=0.9)
        if i % 2
        else Params(max_new_tokens=5 + i)
        for i in range(7)
    ]
    batch = [make_request(i + 1, ps[i + 1], alloc, p) for i, p in enumerate(others)]
    batch.insert(3, make_request(0, ps[0], alloc, sampled))
    assert generate(shard.stub, batch, batch_id=11)[0] == alone
    different = Params(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, seed=99)
    assert generate(shard.stub, [make_request(0, ps[0], alloc, different)], batch_id=12)[0] != alone


def test_logprobs_prefill_logprobs_and_top_tokens(shard, alloc, tiny_llama_hf):
    prompt = prompts(1, seed=4)[0] + [5, 6, 7, 8, 9]
    p = Params(max_new_tokens=2, prefill_logprobs=True, top_n_tokens=3)
    req = make_request(0, prompt, alloc, p, chunk_len=4)
    response = shard.stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=20, requests=[req], size=1)))
    while not response.generations:  # chunked: the first chunks yield nothing
        response = shard.stub.Decode(pb.DecodeRequest(batches=[response.batch]))
    g = response.generations[0]
    with torch.inference_mode():
        logprobs = torch.log_softmax(tiny_llama_hf(torch.tensor([prompt])).logits[0].float(), -1)
    assert list(g.prefill_tokens.ids) == prompt
    assert math.isnan(g.prefill_tokens.logprobs[0])
    expected = [logprobs[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert g.prefill_tokens.logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert g.tokens.logprobs[0] == pytest.approx(logprobs[-1].max().item(), abs=1e-4)
    top = logprobs[-1].topk(3)
    assert list(g.top_tokens[0].ids) == top.indices.tolist()
    assert list(g.top_tokens[0].logprobs) == pytest.approx(top.values.tolist(), abs=1e-4)
    shard.stub.ClearCache(pb.ClearCacheRequest())


def test_bad_requests_fail_the_rpc_and_the_shard_keeps_serving(shard, alloc, tiny_llama_hf):
    bad = [
        make_request(0, [1, 2, 10_000], alloc, Params()),  # token id outside the vocabulary
        pb.Request(
            id=1, input_ids=[1, 2], blocks=[shard.num_blocks + 5]
        ),  # block outside the cache
        pb.Request(id=2, input_ids=[], blocks=[1]),  # no prompt
        pb.Request(id=3, input_ids=list(range(3, 40)), blocks=[1]),  # prompt larger than its blocks
    ]
    for request in bad:
        with pytest.raises(grpc.RpcError) as err:
            shard.stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=30, requests=[request])))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        shard.stub.Decode(pb.DecodeRequest(batches=[pb.CachedBatch(id=999)]))
    assert "not found" in err.value.details()
    prompt = prompts(1, seed=5)[0]
    out = generate(shard.stub, [make_request(7, prompt, alloc, Params(max_new_tokens=4))])
    assert out[7] == hf_greedy(tiny_llama_hf, prompt, 4)


def test_filter_and_clear_leave_no_state(shard, alloc):
    ps = prompts(4, seed=6)
    batch = pb.Batch(
        id=40,
        requests=[make_request(i, p, alloc, Params(max_new_tokens=20)) for i, p in enumerate(ps)],
        size=4,
    )
    response = shard.stub.Prefill(pb.PrefillRequest(batch=batch))
    filtered = shard.stub.FilterBatch(pb.FilterBatchRequest(batch_id=40, request_ids=[1, 3]))
    assert list(filtered.batch.request_ids) == [1, 3] and filtered.batch.size == 2
    assert shard.service.cache.num_requests == 2
    response = shard.stub.Decode(pb.DecodeRequest(batches=[filtered.batch]))
    assert sorted(g.request_id for g in response.generations) == [1, 3]
    shard.stub.ClearCache(pb.ClearCacheRequest(id=40))
    assert len(shard.service.cache) == 0 and shard.service.cache.num_requests == 0
    shard.stub.Prefill(
        pb.PrefillRequest(
            batch=pb.Batch(
                id=41, requests=[make_request(9, ps[0], alloc, Params(max_new_tokens=20))]
            )
        )
    )
    shard.stub.ClearCache(pb.ClearCacheRequest())
    assert len(shard.service.cache) == 0


def test_eos_stops_a_request(shard, alloc, tiny_llama_hf):
    prompt = prompts(1, seed=7)[0]
    first = hf_greedy(tiny_llama_hf, prompt, 3)
    assert first[2] not in first[:2], "the 3rd greedy token must be new: pick another seed"
    # Make the model's 3rd greedy token an end-of-sequence id for this test.
    generator = shard.service.generator
    saved = generator.eos_token_ids
    generator.eos_token_ids = {first[2]} - set(first[:2])
    try:
        req = make_request(0, prompt, alloc, Params(max_new_tokens=10, ignore_eos=False))
        batch = pb.Batch(id=50, requests=[req], size=1)
        response = shard.stub.Prefill(pb.PrefillRequest(batch=batch))
        steps = [response]
        while response.HasField("batch"):
            response = shard.stub.Decode(pb.DecodeRequest(batches=[response.batch]))
            steps.append(response)
    finally:
        generator.eos_token_ids = saved
    last = steps[-1].generations[0]
    assert last.generated_text.finish_reason == pb.FINISH_REASON_EOS_TOKEN
    assert last.generated_text.generated_tokens == 3
    assert not last.generated_text.HasField("seed")
