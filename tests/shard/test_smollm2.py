"""The real default model (SmolLM2-135M-Instruct, converted from the package's GGUF) served by
the shard's gRPC server: greedy tokens equal `transformers.generate` on the same checkpoint,
alone and all in one batch."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import SMOLLM2_PROMPTS
from tests.shard.harness import BlockAllocator, Params, ShardHarness, generate, make_request

pytestmark = pytest.mark.slow
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    """Half as chat turns (so EOS can end them early), half as plain text."""
    out = []
    for i, text in enumerate(SMOLLM2_PROMPTS):
        if i % 2 == 0:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(text)["input_ids"]
        out.append(list(ids))
    return out


@pytest.fixture(scope="module")
def expected(smollm2_dir, prompt_ids) -> list[list[int]]:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for ids in prompt_ids:
            generated = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
            outs.append(generated[0, len(ids) :].tolist())
    return outs


@pytest.fixture(scope="module")
def shard(smollm2_dir, tmp_path_factory):
    harness = ShardHarness(
        smollm2_dir, tmp_path_factory.mktemp("sock") / "shard", kv_bytes=256 * 2**20
    )
    from pb import generate_pb2 as pb

    response = harness.stub.Warmup(pb.WarmupRequest(max_prefill_tokens=512))
    harness.num_blocks = response.max_supported_total_tokens // harness.config.block_size
    yield harness
    harness.close()


def test_greedy_alone_matches_transformers(shard, prompt_ids, expected):
    alloc = BlockAllocator(shard.num_blocks, shard.config.block_size)
    for i, ids in enumerate(prompt_ids):
        request = make_request(i, ids, alloc, Params(max_new_tokens=NEW_TOKENS, ignore_eos=False))
        assert generate(shard.stub, [request], batch_id=i)[i] == expected[i], SMOLLM2_PROMPTS[i]


def test_greedy_in_one_batch_matches_transformers(shard, prompt_ids, expected):
    alloc = BlockAllocator(shard.num_blocks, shard.config.block_size)
    requests = [
        make_request(i, ids, alloc, Params(max_new_tokens=NEW_TOKENS, ignore_eos=False))
        for i, ids in enumerate(prompt_ids)
    ]
    out = generate(shard.stub, requests, batch_id=100)
    assert [out[i] for i in range(len(prompt_ids))] == expected
    assert len(shard.service.cache) == 0


def test_seeded_sampling_alone_equals_inside_a_batch_of_8(shard, prompt_ids):
    alloc = BlockAllocator(shard.num_blocks, shard.config.block_size)
    sampled = Params(max_new_tokens=24, do_sample=True, temperature=0.7, top_p=0.9, seed=42)
    alone = generate(shard.stub, [make_request(0, prompt_ids[0], alloc, sampled)], batch_id=200)[0]
    alloc = BlockAllocator(shard.num_blocks, shard.config.block_size)
    others = [Params(max_new_tokens=24, do_sample=i % 2 == 0, seed=i, top_k=50) for i in range(7)]
    batch = [make_request(i + 1, prompt_ids[i + 1], alloc, p) for i, p in enumerate(others)]
    batch.insert(5, make_request(0, prompt_ids[0], alloc, sampled))
    assert generate(shard.stub, batch, batch_id=201)[0] == alone
