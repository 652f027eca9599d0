"""Tests for shard.sampling.watermark and its place in shard.sampling.sampler.sample (the first
processor)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from shard.sampling import logits_processors as lp
from shard.sampling.sampler import RequestSampler, SamplingParams, sample
from shard.sampling.watermark import HASH_KEY, Watermark

V = 1000
GREEDY_WM = SamplingParams(watermark=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _logits(b: int, seed: int, v: int = V, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * scale


def _run(logits: torch.Tensor, params: list[SamplingParams], histories, top_n: int = 0, **kw):
    return sample(logits, [RequestSampler(p) for p in params], histories, top_n=top_n, **kw)


def _generate(params: SamplingParams, steps: int, seed: int = 0) -> list[int]:
    """One request, `steps` tokens over random logits; returns prompt token + output."""
    history = [7]
    sampler = RequestSampler(params)
    for step in range(steps):
        out = sample(_logits(1, seed * 10_000 + step), [sampler], [history])
        history.append(int(out.next_ids[0]))
    return history


def _tgi_reference(scores: torch.Tensor, prev_token: int, gamma: float, delta: float):
    """TGI's WatermarkLogitsProcessor.__call__ on one row [1, V] (CPU), for comparison."""
    rng = torch.Generator(device="cpu")
    rng.manual_seed(HASH_KEY * prev_token)
    greenlist_ids = torch.randperm(scores.shape[-1], generator=rng)[: int(scores.shape[-1] * gamma)]
    mask = torch.zeros_like(scores)
    mask[-1, greenlist_ids] = 1
    mask = mask.bool()
    scores[mask] = scores[mask] + delta
    return scores


# ---------------------------------------------------------------- the processor


@pytest.mark.parametrize(("gamma", "delta"), [(0.5, 2.0), (0.25, 5.0)])
def test_matches_tgi_processor(gamma: float, delta: float) -> None:
    wm = Watermark(gamma, delta)
    scores = _logits(3, seed=1)
    prev = [0, 5, 123_456]
    ours = wm.apply(scores.clone(), prev)
    for i, t in enumerate(prev):
        ref = _tgi_reference(scores[i : i + 1].clone(), t, gamma, delta)
        assert torch.equal(ours[i : i + 1], ref)
    assert int(wm.green_mask(5, V).sum()) == int(V * gamma)


def test_minus_inf_stays_minus_inf() -> None:
    scores = torch.full((1, V), float("-inf"))
    scores[0, :10] = 0.0
    out = Watermark().apply(scores, [3])
    assert torch.isinf(out[0, 10:]).all() and torch.isfinite(out[0, :10]).all()


def test_green_list_is_the_same_in_another_process() -> None:
    code = (
        "from shard.sampling.watermark import Watermark;"
        "print(Watermark().green_ids(42, 5000)[:16].tolist())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert other.strip() == str(Watermark().green_ids(42, 5000)[:16].tolist())


# ---------------------------------------------------------------- detection


def test_greedy_generation_with_watermark_is_detected() -> None:
    tokens = _generate(GREEDY_WM, steps=200)
    z = Watermark().detect(tokens, V)
    assert z > 8, z  # ~N(0, 1) without a watermark


def test_sampled_generation_with_watermark_is_detected() -> None:
    params = SamplingParams(watermark=True, do_sample=True, seed=3)
    z = Watermark().detect(_generate(params, steps=200, seed=1), V)
    assert z > 4, z


def test_no_watermark_scores_near_zero() -> None:
    """The same logits as the watermarked runs above: z is an ordinary N(0, 1) draw."""
    wm = Watermark()
    for params in (SamplingParams(), SamplingParams(do_sample=True, seed=5)):
        z = wm.detect(_generate(params, steps=200), V)
        assert abs(z) < 3, z


def test_detect_hand_counted() -> None:
    wm = Watermark()
    green = wm.green_ids(9, V)
    red = int(torch.nonzero(~wm.green_mask(9, V))[0])
    tokens = [9, int(green[0])]
    assert wm.count_green(tokens, V) == 1
    assert wm.detect(tokens, V) == pytest.approx(1.0)  # (1 - 0.5) / sqrt(0.25)
    assert wm.detect([9, red], V) == pytest.approx(-1.0)
    assert wm.detect([9], V) == 0.0


# ---------------------------------------------------------------- in the sampler


def test_green_list_depends_only_on_the_previous_token() -> None:
    """The same logits row and last token give the same choice in any position and batch."""
    row = _logits(1, seed=4)
    history = [1, 2, 3, 77]
    alone = _run(row, [GREEDY_WM], [history], top_n=V)
    others = _logits(3, seed=5)
    batch = torch.cat([others[:2], row, others[2:]])
    params = [SamplingParams(do_sample=True, seed=1), GREEDY_WM, GREEDY_WM, SamplingParams()]
    histories = [[5, 77], [8, 9], [50, 77], [77]]  # other rows share or not the last token
    mixed = _run(batch, params, histories, top_n=V)
    assert int(mixed.next_ids[2]) == int(alone.next_ids[0])
    assert torch.equal(mixed.top_ids[2], alone.top_ids[0])
    torch.testing.assert_close(mixed.top_logprobs[2], alone.top_logprobs[0])
    # A different history ending in the same token: same green list.
    assert torch.equal(
        _run(row, [GREEDY_WM], [[77]], top_n=V).top_logprobs,
        alone.top_logprobs,
    )


def test_rows_without_watermark_are_untouched() -> None:
    logits = _logits(5, seed=6)
    plain = [
        SamplingParams(),
        SamplingParams(do_sample=True, seed=2, top_k=50),
        SamplingParams(repetition_penalty=1.3),
    ]
    histories = [[1, 2], [3], [4, 4, 5], [6, 7], [8]]
    base = _run(logits[:3], plain, histories[:3], top_n=5)
    params = [*plain, GREEDY_WM, SamplingParams(watermark=True, do_sample=True, seed=9)]
    mixed = _run(logits, params, histories, top_n=5)
    assert torch.equal(mixed.next_ids[:3], base.next_ids)
    assert torch.equal(mixed.top_ids[:3], base.top_ids)
    torch.testing.assert_close(mixed.logprobs[:3], base.logprobs)


def test_watermark_runs_before_the_penalties() -> None:
    logits = _logits(1, seed=7, scale=3.0)
    history = [2, 5, 11, 40]
    params = SamplingParams(watermark=True, repetition_penalty=1.5)
    out = _run(logits, [params], [history], top_n=V)
    expected = Watermark().apply(logits.clone(), [history[-1]])
    rows, ids = lp.history_index([history], V)
    expected = lp.apply_repetition_penalty(expected, rows, ids, torch.tensor([1.5]))
    ref = torch.log_softmax(expected, dim=-1)[0]
    torch.testing.assert_close(out.top_logprobs[0], ref[out.top_ids[0]])


def test_custom_strength_and_empty_history() -> None:
    logits = torch.zeros(2, V)
    strong = Watermark(gamma=0.25, delta=50.0)
    out = _run(logits, [GREEDY_WM, GREEDY_WM], [[3], []], watermark=strong)
    assert bool(strong.green_mask(3, V)[out.next_ids[0]])
    assert float(out.logprobs[0]) == pytest.approx(-torch.log(torch.tensor(V * 0.25)).item())
    assert float(out.logprobs[1]) == pytest.approx(-torch.log(torch.tensor(float(V))).item())


def test_bad_gamma() -> None:
    with pytest.raises(ValueError):
        Watermark(gamma=1.0)
