"""Weight-only quantization: the kernels against their pure-PyTorch reference, the GGUF
blocks kept exactly, GPTQ/AWQ packing, which methods are refused, and models served
quantized against the same model dense."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from shard.checkpoint.convert import default_cache_dir
from shard.engine.kv_cache import KVCache
from shard.models import load_model
from shard.native import build_library
from shard.quant import kernels as quant_kernels
from shard.quant.kernels import (
    BLOCK_SOURCE,
    INCLUDES,
    SOURCE,
    NativeKernels,
    ReferenceKernels,
    get_kernels,
)
from shard.quant.loaders import (
    AWQ_ORDER,
    GGUF_LINK,
    QuantizationError,
    resolve_method,
    unpack_int32,
)
from shard.quant.weight import QuantizedWeight, dequantize, pack_nibbles, quantize, unpack_nibbles
from tests.conftest import OLDER_MARCHES, save_tiny_model, skip_unless_runnable


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


# In features of 5, 6 and 7 blocks: the 512-bit paths' last quad (4 blocks) and pair (2 blocks)
# are partial; rows of x past 4 take a second pass, past direct_max_rows the dense GEMM.
@pytest.mark.parametrize(
    "kind,group,k",
    [("q4", 32, 160), ("q4", 32, 192), ("q4", 64, 192), ("q8", 32, 160), ("q8", 32, 224),
     ("q8", 192, 192)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9])
def test_native_kernel_matches_the_reference(kind, group, k, dtype, rows):
    torch.manual_seed(rows)
    weight = quantize(torch.randn(80, k), kind, group)
    x = torch.randn(rows, k).to(dtype)
    expected = ReferenceKernels().matmul(x.float(), weight)
    got = get_kernels().matmul(x, weight)
    assert got.dtype == dtype and got.shape == (rows, 80)
    # x is quantized to int8 blocks in the direct kernel: ~1 % of the largest output
    assert relative_error(got, expected) < 0.02


@pytest.mark.parametrize("march", sorted(OLDER_MARCHES))
def test_older_instruction_sets_match_the_reference(march):
    """The kernels' AVX2 and plain-C paths (and AVX-512 without VNNI), which CI machines may
    run natively, built for those instruction sets and run on this CPU."""
    skip_unless_runnable(march)
    cache = default_cache_dir() / "kernels"
    kernels = NativeKernels(
        build_library(cache, SOURCE, INCLUDES, march),
        build_library(cache, BLOCK_SOURCE, INCLUDES, march),
    )
    kernels.direct_max_rows = 16  # every product below takes the direct path
    for kind, group, k in [("q4", 32, 160), ("q4", 64, 192), ("q8", 32, 160), ("q8", 192, 192)]:
        weight = quantize(torch.randn(40, k), kind, group)
        for rows in (1, 5):
            x = torch.randn(rows, k)
            expected = ReferenceKernels().matmul(x, weight)
            assert relative_error(kernels.matmul(x, weight), expected) < 0.02
            dense = kernels.dequantize(weight, torch.float32)
            assert torch.equal(dense, dequantize(weight))


def test_native_kernels_are_built_here():
    assert get_kernels().name == "native"  # gcc exists on every machine we run on


def test_dense_copy_serves_large_steps(fast_numerics):
    weight = quantize(torch.randn(64, 96), "q4", 32)
    kept = QuantizedWeight(**{**weight.__dict__, "dense": torch.zeros(64, 96)})
    x = torch.randn(get_kernels().direct_max_rows + 1, 96)
    assert get_kernels().matmul(x, kept).abs().max() == 0  # the (zero) dense copy was used
    assert relative_error(get_kernels().matmul(x, weight), x @ dequantize(weight).t()) < 1e-5


def test_quantize_round_trip_and_nibble_layout():
    w = torch.randn(16, 64)
    for kind, bound in (("q4", 0.5 / 15), ("q8", 0.5 / 127)):
        q = quantize(w, kind, 32)
        span = w.view(16, 2, 32).amax(-1) - w.view(16, 2, 32).amin(-1)
        err = (dequantize(q) - w).abs().view(16, 2, 32).amax(-1)
        scale = span if kind == "q4" else w.view(16, 2, 32).abs().amax(-1) * 2
        assert (err <= bound * scale + 1e-6).all()
    values = torch.randint(0, 16, (3, 64))
    packed = pack_nibbles(values)
    assert torch.equal(unpack_nibbles(packed).long(), values)
    assert int(packed[0, 0]) == int(values[0, 0]) | int(values[0, 16]) << 4  # GGUF's order


def test_shards_split_on_groups():
    w = quantize(torch.randn(8, 128), "q4", 32)
    assert torch.equal(dequantize(w.columns(32, 96)), dequantize(w)[:, 32:96])
    assert torch.equal(dequantize(w.rows(2, 5)), dequantize(w)[2:5])
    with pytest.raises(ValueError, match="groups"):
        w.columns(16, 48)
    fused = QuantizedWeight.cat_rows([w.rows(0, 3), w.rows(3, 8)])
    assert torch.equal(dequantize(fused), dequantize(w))


def test_gguf_blocks_are_the_dequantized_checkpoint(smollm2_dir):
    """Each matrix read from the file's blocks equals its dequantized copy, bit for bit."""
    from safetensors import safe_open

    from shard.checkpoint.gguf_weights import GGUFWeights
    from shard.quant.loaders import Quantizer

    weights = GGUFWeights(smollm2_dir, torch.float32, quantizer=Quantizer("gguf", smollm2_dir))
    dense = safe_open(smollm2_dir / "model.safetensors", "pt")
    prefixes = {name.rsplit(".", 1)[0] for name in weights.tensors}
    quantized = {p: weights.file_matrix(p) for p in prefixes}
    quantized = {p: m for p, m in quantized.items() if m is not None}
    assert len(quantized) == 30 * 7 + 1  # every Q4_1 matrix, and the Q8_0 embedding (tied head)
    for prefix in ("model.layers.0.self_attn.q_proj", "model.layers.7.self_attn.k_proj",
                   "model.layers.29.mlp.down_proj", "model.embed_tokens"):  # fmt: skip
        w = quantized[prefix]
        assert w.kind == ("q8" if prefix == "model.embed_tokens" else "q4")
        assert torch.equal(dequantize(w), dense.get_tensor(f"{prefix}.weight"))  # bit for bit
    weights.close()


# --- GPTQ / AWQ: packed here as their tools pack them ---------------------------------


def pack_int32(values: torch.Tensor, dim: int, order=None, bits: int = 4) -> torch.Tensor:
    """values 0..2^bits-1 -> int32 words of 32/bits along dim; field i holds value order[i]."""
    per_word = 32 // bits
    order = tuple(range(per_word)) if order is None else order
    v = values.to(torch.int64)
    if dim == 0:
        v = v.t()
    v = v.reshape(v.shape[0], -1, per_word)
    words = sum(v[..., order[i]] << (bits * i) for i in range(per_word))
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.t().contiguous() if dim == 0 else words


def int4_checkpoint(method: str, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor):
    """q [K, N], zeros [K/g, N] 0..15, scales [K/g, N] -> the checkpoint's tensors."""
    if method == "gptq":  # v1 stores zero - 1
        return {
            "qweight": pack_int32(q, dim=0),
            "qzeros": pack_int32(zeros - 1, dim=1),
            "scales": scales.half(),
            "g_idx": torch.arange(q.shape[0], dtype=torch.int32) // (q.shape[0] // scales.shape[0]),
        }
    return {
        "qweight": pack_int32(q, dim=1, order=AWQ_ORDER),
        "qzeros": pack_int32(zeros, dim=1, order=AWQ_ORDER),
        "scales": scales.half(),
    }


def test_unpack_int32_inverts_packing():
    values = torch.randint(0, 16, (16, 24))
    assert torch.equal(unpack_int32(pack_int32(values, 0), 0), values)
    assert torch.equal(unpack_int32(pack_int32(values, 1, AWQ_ORDER), 1, AWQ_ORDER), values)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_int4_checkpoints_load_as_their_dense_equivalent(tmp_path, method):
    """A tiny model whose linear layers are stored GPTQ/AWQ-packed loads the weights of the
    same model dequantized into a dense checkpoint: exactly, but for min = -zero * scale, which
    is rounded to float16 (at most 2^-11 of 15 * scale, a 270th of a quantization step)."""
    dense_dir = save_tiny_model(tmp_path / "dense")
    tensors = {}
    from safetensors import safe_open

    group = 32
    with safe_open(dense_dir / "model.safetensors", "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if name.endswith("proj.weight"):
                n, k = t.shape
                q = torch.randint(0, 16, (k, n))
                # GPTQ v1 stores zero - 1 in 4 bits, so its zeros are 1..15
                zeros = torch.randint(1 if method == "gptq" else 0, 16, (k // group, n))
                scales = (torch.rand(k // group, n) * 0.02 + 0.001).half().float()
                prefix = name.removesuffix(".weight")
                packed = int4_checkpoint(method, q, zeros, scales)
                tensors.update({f"{prefix}.{key}": v for key, v in packed.items()})
                g = torch.arange(k) // group
                t = ((q - zeros[g]) * scales[g]).t().contiguous()  # the dense equivalent [N, K]
            tensors[name] = t
    quant_dir, ref_dir = tmp_path / "quant", tmp_path / "ref"
    for d in (quant_dir, ref_dir):
        d.mkdir()
        config = json.loads((dense_dir / "config.json").read_text())
        if d is quant_dir:
            config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": group}
        (d / "config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in tensors.items() if not k.endswith("proj.weight")},
              quant_dir / "model.safetensors")  # fmt: skip
    save_file({k: v for k, v in tensors.items() if "." + k.rsplit(".", 1)[1] in (".weight",)},
              ref_dir / "model.safetensors")  # fmt: skip
    assert resolve_method(None, quant_dir) == method
    quantized = load_model(quant_dir, torch.float32, quantize=method)
    reference = load_model(ref_dir, torch.float32)
    layer = quantized.layers[0].mlp.gate_up_proj.weight
    assert isinstance(layer, QuantizedWeight) and layer.group == group
    expected = reference.layers[0].mlp.gate_up_proj.weight
    assert torch.allclose(dequantize(layer), expected, atol=15 * 0.021 * 2**-11, rtol=0)


def forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """One prefill of ids [1, T] through a fresh paged cache: the logits of every token."""
    from tests.shard.test_model import NUM_BLOCKS, PagedSequence, run_step

    cache = KVCache(
        model.config.num_layers, NUM_BLOCKS, 4, model.num_kv_heads, model.head_dim, torch.float32
    )
    seq = PagedSequence(ids[0].tolist(), list(range(1, 9)))
    return run_step(model, cache, [seq], [ids.shape[1]])


def gptq_layer(k: int, n: int, group: int, bits: int, act_order: bool, seed: int):
    """A GPTQ v1 layer's tensors and its dense equivalent [N, K], as AutoGPTQ packs them:
    with act-order, g_idx gives each input column the group of its rank in a random order."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (k, n), generator=gen)
    if bits == 8:  # sym=True: every zero point is 128
        zeros = torch.full((k // group, n), 128)
    else:
        zeros = torch.randint(1, 16, (k // group, n), generator=gen)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.001).half().float()
    rank = torch.randperm(k, generator=gen) if act_order else torch.arange(k)
    g_idx = rank // group  # [K]: column c is in group g_idx[c]
    tensors = {
        "qweight": pack_int32(q, dim=0, bits=bits),
        "qzeros": pack_int32(zeros - 1, dim=1, bits=bits),  # v1 stores zero - 1
        "scales": scales.half(),
        "g_idx": g_idx.to(torch.int32),
    }
    dense = ((q - zeros[g_idx]) * scales[g_idx]).t().contiguous()
    return tensors, dense


@pytest.mark.parametrize("bits,act_order", [(4, True), (8, False), (8, True)])
def test_gptq_act_order_and_8_bit_load_as_their_dense_equivalent(tmp_path, bits, act_order):
    """desc_act checkpoints (a permuted g_idx) and 8-bit ones serve the weights they store:
    the dequantized matrix equals the dense one, and the model's logits agree with it."""
    dense_dir = save_tiny_model(tmp_path / "dense")
    from safetensors import safe_open

    tensors, reference_tensors = {}, {}
    with safe_open(dense_dir / "model.safetensors", "pt") as f:
        for i, name in enumerate(f.keys()):
            t = f.get_tensor(name)
            if name.endswith("proj.weight"):
                n, k = t.shape
                packed, t = gptq_layer(k, n, 32, bits, act_order, seed=i)
                prefix = name.removesuffix(".weight")
                tensors.update({f"{prefix}.{key}": v for key, v in packed.items()})
            else:
                tensors[name] = t
            reference_tensors[name] = t
    config = json.loads((dense_dir / "config.json").read_text())
    quant_dir, ref_dir = write_config(tmp_path / "quant"), write_config(tmp_path / "ref")
    quant_config = {"quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": act_order}
    (quant_dir / "config.json").write_text(
        json.dumps({**config, "quantization_config": quant_config})
    )
    (ref_dir / "config.json").write_text(json.dumps(config))
    save_file(tensors, quant_dir / "model.safetensors")
    save_file(reference_tensors, ref_dir / "model.safetensors")
    quantized = load_model(quant_dir, torch.float32, quantize="gptq")
    reference = load_model(ref_dir, torch.float32)
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        w = quantized.layers[0].get_submodule(name).weight
        expected = reference.layers[0].get_submodule(name).weight
        if act_order:  # each layer its own order: q | k | v and gate | up stay apart
            parts = w.parts if hasattr(w, "parts") else (w,)
            got = torch.cat([dequantize(p) for p in parts])
            assert all(p.perm is not None for p in parts)
        else:
            assert w.kind == ("q8" if bits == 8 else "q4")
            got = dequantize(w)
        assert torch.allclose(got, expected, atol=15 * 0.021 * 2**-11, rtol=0), name
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    torch.testing.assert_close(
        forward_logits(quantized, ids), forward_logits(reference, ids), rtol=0.05, atol=0.05
    )


def write_config(path, **extra):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", **extra}))
    return path


def test_method_resolution_and_refusals(tmp_path):
    plain = write_config(tmp_path / "plain")
    assert resolve_method(None, plain) == "none"
    assert resolve_method("int8", plain) == "eetq"
    assert resolve_method("int4", plain) == "int4"
    with pytest.raises(QuantizationError, match="not supported on the CPU"):
        resolve_method("bitsandbytes", plain)
    with pytest.raises(QuantizationError, match="needs a gptq checkpoint"):
        resolve_method("gptq", plain)
    with pytest.raises(QuantizationError, match="converted from a .gguf"):
        resolve_method("gguf", plain)
    fp8 = write_config(tmp_path / "fp8", quantization_config={"quant_method": "fp8"})
    with pytest.raises(QuantizationError, match="'fp8', which cannot be served"):
        resolve_method(None, fp8)
    gptq = write_config(tmp_path / "gptq", quantization_config={"quant_method": "gptq", "bits": 3})
    with pytest.raises(QuantizationError, match="of 3 bits cannot be served"):
        resolve_method(None, gptq)
    awq = write_config(tmp_path / "awq", quantization_config={"quant_method": "awq", "bits": 4})
    with pytest.raises(QuantizationError, match="cannot apply"):
        resolve_method("int8", awq)
    blocks = write_config(tmp_path / "blocks")
    (blocks / GGUF_LINK).write_bytes(b"")
    assert resolve_method(None, blocks) == "gguf"
    assert resolve_method("none", blocks) == "none"


@pytest.mark.parametrize("method,tolerance", [("eetq", 0.02), ("int4", 0.25)])
def test_quantized_tiny_model_stays_close_to_dense(tiny_llama_dir, method, tolerance):
    dense = load_model(tiny_llama_dir, torch.float32)
    quantized = load_model(tiny_llama_dir, torch.float32, quantize=method)
    head = quantized.lm_head.weight
    assert isinstance(head, QuantizedWeight) and head.kind == "q8"  # the head stays 8-bit
    for name in ("qkv_proj", "o_proj"):
        q = getattr(quantized.layers[1].self_attn, name).weight
        d = getattr(dense.layers[1].self_attn, name).weight
        assert q.kind == ("q8" if method == "eetq" else "q4")
        assert relative_error(dequantize(q), d) < tolerance


def test_keep_dense_holds_the_dequantized_matrix(tiny_llama_dir):
    model = load_model(tiny_llama_dir, torch.bfloat16, quantize="int4", keep_dense=True)
    w = model.layers[0].mlp.down_proj.weight
    assert w.dense is not None and w.dense.dtype == torch.bfloat16
    assert torch.equal(w.dense, dequantize(w, torch.bfloat16))


def test_tensor_parallel_ranks_split_quantized_matrices(tiny_llama_dir):
    from shard.distributed import Dist

    full = load_model(tiny_llama_dir, torch.float32, quantize="int4")
    part = load_model(tiny_llama_dir, torch.float32, dist=Dist(1, 2), quantize="int4")
    down_full = dequantize(full.layers[0].mlp.down_proj.weight)  # [hidden, intermediate]
    down_part = dequantize(part.layers[0].mlp.down_proj.weight)
    assert torch.equal(down_part, down_full[:, 64:])


def test_reference_kernels_when_no_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "no-such-compiler")
    with pytest.raises(RuntimeError, match="no C compiler"):
        build_library(tmp_path, quant_kernels.SOURCE)


def test_served_gguf_quantization_agrees_with_the_float32_oracle(smollm2_dir):
    """The quality target: greedy tokens agree on >= 90 % of 8 prompts x 64 tokens, through
    the decode kernels (int8 activations) in bfloat16, as the server runs by default."""
    from shard.bootstrap import load_generator
    from shard.config import MemoryBudget, ShardConfig
    from shard.quant.quality import PROMPTS, compare, oracle_continuations

    oracle = oracle_continuations(smollm2_dir, PROMPTS, 64)
    config = ShardConfig(
        model_dir=str(smollm2_dir),
        model_id="smollm2",
        dtype="bfloat16",
        kv_cache_memory=MemoryBudget(bytes=16 * 2**20),
    )
    generator, _ = load_generator(config)
    generator.runner.allocate_cache(64)
    assert generator.runner.quantize == "gguf"
    quality = compare(generator.runner, oracle)
    assert quality.positions == 8 * 64
    assert quality.agreement >= 0.9, quality
    assert quality.mean_kl < 0.05, quality
