"""The compiled decoder (shard/models/llama_decode.c) against the model's eager layers, its
reference: the same logits and the same K/V written, step after step, for one to four
sequences with scattered blocks, q4 and q8 weights, float32 and bfloat16; and the steps it
leaves to the eager layers."""

from __future__ import annotations

import ctypes
import random

import pytest
import torch

from shard.attention.paged_decode import SOURCE as ATTENTION_SOURCE
from shard.checkpoint.convert import default_cache_dir
from shard.distributed import Dist
from shard.engine.forward_context import AttentionMetadata
from shard.engine.kv_cache import KVCache
from shard.models import load_model
from shard.models.llama_decode import SOURCE, CompiledDecoder, unsupported_reason
from shard.native import SIMD_HEADER, build_library
from shard.quant.kernels import SOURCE as KERNELS_SOURCE
from shard.quant.kernels import get_kernels
from tests.conftest import OLDER_MARCHES, save_tiny_model, skip_unless_runnable
from tests.shard.test_model import BLOCK_SIZE, PagedSequence, run_step

NUM_BLOCKS = 8 * 16 + 1  # 8 blocks for each of up to 16 sequences, and the null block


def new_cache(model, dtype: torch.dtype) -> KVCache:
    c = model.config
    return KVCache(c.num_layers, NUM_BLOCKS, BLOCK_SIZE, c.num_kv_heads, c.head_dim, dtype)


def sequences(n: int, seed: int) -> list[PagedSequence]:
    rng = random.Random(seed)
    free = list(range(1, NUM_BLOCKS))
    rng.shuffle(free)
    return [
        PagedSequence([rng.randrange(128) for _ in range(rng.randint(3, 20) + 8)],
                      [free.pop() for _ in range(8)])
        for _ in range(n)
    ]  # fmt: skip


def decode(model, dtype: torch.dtype, batch: int, compiled: bool, steps: int = 8, kv_dtype=None):
    """Prefills `batch` sequences eagerly, then decodes `steps` tokens each (with the compiled
    decoder or without); returns every decode step's logits and the cache. The eager decode
    steps take the quantized kernels' direct path, which quantizes activations as the compiled
    decoder does, however many rows they have (past direct_max_rows they would not)."""
    decoder, kernels = model.decoder, get_kernels()
    direct_max_rows = kernels.direct_max_rows
    cache = new_cache(model, kv_dtype or dtype)
    seqs = sequences(batch, seed=batch)
    prompt = [len(s.token_ids) - steps for s in seqs]
    run_step(model, cache, seqs, prompt)
    out = []
    try:
        model.decoder = decoder if compiled else None
        kernels.direct_max_rows = max(batch, direct_max_rows)
        for _ in range(steps):
            out.append(run_step(model, cache, seqs, [1] * batch))
    finally:
        model.decoder = decoder
        kernels.direct_max_rows = direct_max_rows
    return torch.stack(out), cache


def assert_close_up_to_rounding_flips(ours: torch.Tensor, eager: torch.Tensor) -> None:
    """Both paths quantize each product's input to int8 (shard/quant/kernels.c), so a float
    difference in the last bit (another summation order, exp) can flip one value's rounding:
    that moves a few outputs by ~0.3 % of the largest, and the mean by little: ~1e-7 relative
    without a flip, 1e-5 with one, 2e-4 where one in an early step reaches the later steps
    through the cache; a wrong rotary or scale moves it by 1e-1."""
    scale = eager.abs().max()
    diff = (ours - eager).abs()
    assert diff.max() <= 0.01 * scale, f"max difference {diff.max():.2e} of {scale:.2e}"
    assert diff.mean() <= 1e-3 * scale, f"mean difference {diff.mean():.2e} of {scale:.2e}"


def assert_same_tokens_unless_tied(ours: torch.Tensor, reference: torch.Tensor, error) -> None:
    """The same greedy tokens wherever the reference's best two logits are further apart than
    twice `error` (what the paths may differ by: a near-tie may go either way); most are."""
    best, second = reference.topk(2, dim=-1).values.unbind(-1)
    clear = best - second > 2 * error
    assert clear.float().mean() >= 0.5
    assert torch.equal(ours.argmax(-1)[clear], reference.argmax(-1)[clear])


@pytest.fixture(scope="module", params=["int4", "eetq"])
def quantized(request, tiny_llama_dir):
    return {
        dtype: load_model(tiny_llama_dir, dtype, quantize=request.param)
        for dtype in (torch.float32, torch.bfloat16)
    }


@pytest.mark.parametrize("batch", [1, 2, 5, 8, 13])
def test_float32_steps_match_the_eager_layers(quantized, batch):
    model = quantized[torch.float32]
    assert model.decoder is not None
    if batch > model.decoder.max_rows:
        pytest.skip(f"this CPU's direct products take up to {model.decoder.max_rows} rows")
    ours, our_cache = decode(model, torch.float32, batch, compiled=True)
    eager, eager_cache = decode(model, torch.float32, batch, compiled=False)
    assert_close_up_to_rounding_flips(ours, eager)
    assert_same_tokens_unless_tied(ours, eager, (ours - eager).abs().amax(-1))
    for a, b in zip(our_cache.layers, eager_cache.layers):
        assert_close_up_to_rounding_flips(a.key, b.key)
        assert_close_up_to_rounding_flips(a.value, b.value)


def test_bfloat16_steps_stay_close_to_the_eager_layers(quantized):
    """In bfloat16 the eager layers round every op; the compiled decoder computes in float32
    and rounds only what it stores in the cache, so both stay near the float32 result, and
    pick its tokens wherever the best two are further apart than bfloat16's rounding."""
    model = quantized[torch.bfloat16]
    assert model.decoder is not None
    reference, _ = decode(quantized[torch.float32], torch.float32, 2, compiled=False)
    ours, _ = decode(model, torch.bfloat16, 2, compiled=True)
    eager, _ = decode(model, torch.bfloat16, 2, compiled=False)
    scale = reference.abs().max()
    assert (ours - reference).abs().max() <= (eager - reference).abs().max() + 0.01 * scale
    assert_same_tokens_unless_tied(ours, reference, (eager - reference).abs().amax(-1))


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_16_bit_cache_matches_the_eager_layers(quantized, kv_dtype):
    """--kv-cache-dtype under a float32 model: the decoder rounds what it stores as torch's
    .to() does (to nearest even), so both paths stay as close as over a float32 cache."""
    model = quantized[torch.float32]
    ours, our_cache = decode(model, torch.float32, 3, compiled=True, kv_dtype=kv_dtype)
    eager, eager_cache = decode(model, torch.float32, 3, compiled=False, kv_dtype=kv_dtype)
    assert our_cache.layers[0].key.dtype is kv_dtype
    assert_close_up_to_rounding_flips(ours, eager)
    assert_same_tokens_unless_tied(ours, eager, (ours - eager).abs().amax(-1))
    for a, b in zip(our_cache.layers, eager_cache.layers):
        assert_close_up_to_rounding_flips(a.key.float(), b.key.float())
        assert_close_up_to_rounding_flips(a.value.float(), b.value.float())


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("march", sorted(OLDER_MARCHES))
def test_older_instruction_sets_match_the_eager_layers(quantized, march, kv_dtype):
    """The decoder built for the AVX2 and plain-C paths, which CI machines may run natively,
    over a float32 and a float16 cache (their conversions are their own)."""
    skip_unless_runnable(march)
    includes = (KERNELS_SOURCE, ATTENTION_SOURCE, SIMD_HEADER)
    lib = ctypes.CDLL(str(build_library(default_cache_dir() / "kernels", SOURCE, includes, march)))
    model = quantized[torch.float32]
    native = model.decoder
    try:
        model.decoder = CompiledDecoder(lib, model, max_rows=3)
        ours, _ = decode(model, torch.float32, 3, compiled=True, kv_dtype=kv_dtype)
    finally:
        model.decoder = native
    eager, _ = decode(model, torch.float32, 3, compiled=False, kv_dtype=kv_dtype)
    assert_close_up_to_rounding_flips(ours, eager)
    assert_same_tokens_unless_tied(ours, eager, (ours - eager).abs().amax(-1))


def test_biases_and_a_single_kv_head(tmp_path):
    path = save_tiny_model(tmp_path / "m", seed=5, attention_bias=True, num_key_value_heads=1)
    model = load_model(path, torch.float32, quantize="int4")
    ours, _ = decode(model, torch.float32, 2, compiled=True)
    eager, _ = decode(model, torch.float32, 2, compiled=False)
    assert_close_up_to_rounding_flips(ours, eager)


def test_other_steps_and_models_stay_eager(tiny_llama_dir, quantized, fast_numerics):
    assert "dense" in unsupported_reason(load_model(tiny_llama_dir, torch.float32))
    tp = load_model(tiny_llama_dir, torch.float32, dist=Dist(0, 2), quantize="int4")
    assert unsupported_reason(tp) == "tensor parallel" and tp.decoder is None

    decoder: CompiledDecoder = quantized[torch.float32].decoder
    cache = new_cache(quantized[torch.float32], torch.float32)
    ctx = type("Ctx", (), {"kv_cache": cache})()
    rows = decoder.max_rows
    ctx.attn = AttentionMetadata.build([1] * rows, [5] * rows, [[1, 2]] * rows, [5] * rows, 4)
    assert decoder.supports(torch.zeros(rows, 64), ctx)
    more = rows + 1  # beyond them the eager layers and their dense GEMMs win
    ctx.attn = AttentionMetadata.build([1] * more, [5] * more, [[1, 2]] * more, [5] * more, 4)
    assert not decoder.supports(torch.zeros(more, 64), ctx)
    ctx.attn = AttentionMetadata.build([3], [3], [[1]], [4, 5, 6], 4)  # a prefill
    assert not decoder.supports(torch.zeros(3, 64), ctx)
    assert rows >= get_kernels().direct_max_rows


def test_every_step_runs_the_compiled_decoder_when_batch_invariant(quantized):
    decoder: CompiledDecoder = quantized[torch.float32].decoder
    ctx = type("Ctx", (), {"kv_cache": new_cache(quantized[torch.float32], torch.float32)})()
    more = decoder.max_rows + 1
    ctx.attn = AttentionMetadata.build([1] * more, [5] * more, [[1, 2]] * more, [5] * more, 4)
    assert decoder.supports(torch.zeros(more, 64), ctx)
    ctx.attn = AttentionMetadata.build([3, 1], [3, 6], [[1], [2, 3]], [4, 5, 6, 9], 4)  # mixed
    assert decoder.supports(torch.zeros(4, 64), ctx)


@pytest.mark.parametrize("name", ["llama3", "mistral", "qwen2-yarn", "qwen3", "granite", "smollm3"])
def test_the_families_it_describes_match_their_eager_layers(tmp_path, name):
    """Per-head q/k norms (Qwen3), sliding windows (Mistral), NoPE layers (SmolLM3), residual
    and attention multipliers (Granite), yarn's scaled tables, biases: one C decoder over a
    layer description, equal to the eager layers of the same family."""
    from tests.shard.families import save_family

    model = load_model(save_family(name, tmp_path / name), torch.float32, quantize="int4")
    assert model.decoder is not None, unsupported_reason(model)
    ours, _ = decode(model, torch.float32, 3, compiled=True)
    eager, _ = decode(model, torch.float32, 3, compiled=False)
    assert_close_up_to_rounding_flips(ours, eager)


@pytest.mark.parametrize(
    "name, reason",
    [("gemma2", "sandwich"), ("olmo2", "post"), ("mixtral", "experts"),
     ("phi3-longrope", "partial rotary"), ("llama-gelu", "activation")],
)  # fmt: skip
def test_the_families_it_does_not_describe_run_eager(tmp_path, name, reason):
    from tests.shard.families import save_family

    model = load_model(save_family(name, tmp_path / name), torch.float32, quantize="int4")
    assert model.decoder is None and reason in unsupported_reason(model)
