"""Tests for shard.sampling.sampler and shard.sampling.logits_processors against transformers'
processors."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from shard.sampling import logits_processors as lp
from shard.sampling.sampler import RequestSampler, SampleOutput, SamplingParams, sample

V = 1000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add sync cost (and stalls on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, params=["cpu paths", "branch-free paths"])
def _paths(request, monkeypatch):
    """Every test runs twice: with the CPU's branches, and with the branch-free code a GPU
    takes (no host sync), which must give the same results."""
    if request.param == "branch-free paths":
        monkeypatch.setattr(lp, "branches_ok", lambda t: False)


def _logits(b: int, v: int = V, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * scale


def _samplers(params: list[SamplingParams]) -> list[RequestSampler]:
    return [RequestSampler(p) for p in params]


def _run(logits: torch.Tensor, params: list[SamplingParams], histories=None, top_n=0):
    hist = histories if histories is not None else [[] for _ in params]
    return sample(logits, _samplers(params), hist, top_n=top_n)


def _hf_rowwise(warpers: list, x: torch.Tensor) -> torch.Tensor:
    """Each row through its own HF warper: warpers [R], x [R, V] -> [R, V]."""
    dummy = torch.zeros(1, 1, dtype=torch.long)
    return torch.cat([w(dummy, x[i : i + 1].clone()) for i, w in enumerate(warpers)])


def _assert_same_filter(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(ours[finite], ref[finite])


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    ("params", "greedy"),
    [
        (SamplingParams(), True),
        (SamplingParams(temperature=0.0, top_p=0.0, typical_p=0.0), True),
        (SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5), True),
        (SamplingParams(do_sample=True), False),
        (SamplingParams(temperature=0.7), False),
        (SamplingParams(top_k=5), False),
        (SamplingParams(top_p=0.9), False),
        (SamplingParams(typical_p=0.9), False),
    ],
)
def test_is_greedy(params: SamplingParams, greedy: bool) -> None:
    assert params.is_greedy is greedy
    s = RequestSampler(params)
    assert s.sampling is not greedy
    assert (s.generator is None) is greedy


def test_from_proto_duck_typed() -> None:
    class Msg:
        temperature, top_k, top_p, typical_p = 0.5, 3, 0.0, 0.0
        do_sample, seed, repetition_penalty, frequency_penalty, watermark = True, 7, 0.0, 0.0, False

    p = SamplingParams.from_proto(Msg())
    assert p == SamplingParams(0.5, 3, 0.0, 0.0, True, 7, 0.0, 0.0, False)
    s = RequestSampler(p)
    assert (s.temperature, s.top_k, s.penalized) == (0.5, 3, False)
    assert s.top_p is None and s.typical_p is None


# ---------------------------------------------------------------- processors vs transformers


def test_temperature_matches_hf() -> None:
    temps = [0.3, 0.7, 1.5, 2.0]
    x = _logits(len(temps))
    ours = lp.apply_temperature(x.clone(), torch.tensor(temps))
    ref = _hf_rowwise([TemperatureLogitsWarper(t) for t in temps], x)
    torch.testing.assert_close(ours, ref)


def test_top_k_matches_hf() -> None:
    ks = [1, 5, 50, 999, 5000]
    x = _logits(len(ks))
    ours = lp.apply_top_k(x.clone(), torch.tensor(ks))
    ref = _hf_rowwise([TopKLogitsWarper(k) for k in ks], x)
    _assert_same_filter(ours, ref)
    assert (torch.isfinite(ours).sum(1) == torch.tensor(ks).clamp(max=V)).all()


@pytest.mark.parametrize("prefixes", [(1,), (8,), (8, 64), (256, 4096), (V,), ()])
def test_top_p_matches_hf(prefixes: tuple[int, ...]) -> None:
    """Rows whose cut is inside the top-`prefix` and rows that fall back to the full sort."""
    ps = [0.05, 0.3, 0.8, 0.95, 0.999]
    x = _logits(len(ps))
    ours = lp.apply_top_p(x.clone(), torch.tensor(ps), prefixes=prefixes)
    ref = _hf_rowwise([TopPLogitsWarper(p) for p in ps], x)
    _assert_same_filter(ours, ref)


def test_top_p_after_top_k_uses_prefix() -> None:
    x = lp.apply_top_k(_logits(3), torch.tensor([5, 20, 40]))
    ps = [0.9, 0.5, 0.99]
    ours = lp.apply_top_p(x.clone(), torch.tensor(ps), prefixes=(64,))
    ref = _hf_rowwise([TopPLogitsWarper(p) for p in ps], x)
    _assert_same_filter(ours, ref)


def test_typical_p_matches_hf() -> None:
    ms = [0.05, 0.2, 0.5, 0.9, 0.99]
    x = _logits(len(ms))
    ours = lp.apply_typical_p(x.clone(), torch.tensor(ms))
    ref = _hf_rowwise([TypicalLogitsWarper(m) for m in ms], x)
    _assert_same_filter(ours, ref)


def test_repetition_penalty_matches_hf() -> None:
    pens = [1.2, 0.8, 2.0]
    hists = [[1, 2, 2, 3, 999], [0, 5, 5, 5], [7]]
    x = _logits(len(pens))
    rows, ids = lp.history_index(hists, V)
    ours = lp.apply_repetition_penalty(x.clone(), rows, ids, torch.tensor(pens))
    ref = torch.cat(
        [
            RepetitionPenaltyLogitsProcessor(p)(torch.tensor([h]), x[i : i + 1].clone())
            for i, (p, h) in enumerate(zip(pens, hists, strict=True))
        ]
    )
    torch.testing.assert_close(ours, ref)


def test_penalties_hand_computed() -> None:
    x = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    hist = [[0, 1, 1, 3]]
    out = _run(x, [SamplingParams(repetition_penalty=2.0, frequency_penalty=0.4)], hist, top_n=5)
    # repetition: ids 0, 1, 3 seen -> 1.0, -2.0, 0.5, 1.5, -2.0
    # frequency: counts 1, 2, 0, 1, 0 over len 4 -> minus 0.1, 0.2, 0, 0.1, 0
    expected = torch.tensor([[0.9, -2.2, 0.5, 1.4, -2.0]])
    ref_lp = torch.log_softmax(expected, -1)
    assert out.next_ids.tolist() == [3]
    torch.testing.assert_close(out.logprobs, ref_lp[:, 3])
    order = torch.argsort(ref_lp, descending=True)
    assert out.top_ids.tolist() == order.tolist()
    torch.testing.assert_close(out.top_logprobs, ref_lp.gather(1, order))


def test_penalties_only_touch_their_rows_and_ignore_oob_ids() -> None:
    x = _logits(4, v=10)
    hist = [[1, 1, 2], [1, 1, 2], [4, 12, 4], [0, 3, 3]]  # 12 is outside the vocab
    params = [
        SamplingParams(),
        SamplingParams(frequency_penalty=1.5),
        SamplingParams(frequency_penalty=-1.0),
        SamplingParams(repetition_penalty=3.0),
    ]
    out = _run(x, params, hist, top_n=10)
    exp = x.clone()
    exp[1, 1] -= 1.5 * 2 / 3
    exp[1, 2] -= 1.5 * 1 / 3
    exp[2, 4] += 1.0 * 2 / 3
    for i in (0, 3):
        exp[3, i] = exp[3, i] * 3.0 if exp[3, i] < 0 else exp[3, i] / 3.0
    torch.testing.assert_close(
        out.top_logprobs, torch.log_softmax(exp, -1).sort(-1, descending=True).values
    )


# ---------------------------------------------------------------- the full step


def test_greedy_fast_path() -> None:
    x = _logits(16)
    x_before = x.clone()
    out = _run(x, [SamplingParams()] * 16, top_n=3)
    assert isinstance(out, SampleOutput)
    assert torch.equal(out.next_ids, x.argmax(-1))
    assert out.next_ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    ref = torch.log_softmax(x, -1)
    torch.testing.assert_close(out.logprobs, ref.max(-1).values)
    top = ref.topk(3)
    assert torch.equal(out.top_ids, top.indices)
    torch.testing.assert_close(out.top_logprobs, top.values)
    assert torch.equal(x, x_before), "sample must not modify the caller's logits"


def test_no_top_n() -> None:
    out = _run(_logits(2), [SamplingParams()] * 2)
    assert out.top_ids is None and out.top_logprobs is None


def test_mixed_batch_logprobs_match_hf_chain() -> None:
    params = [
        SamplingParams(temperature=0.7, top_k=50, top_p=0.9, typical_p=0.95, seed=1),
        SamplingParams(),
        SamplingParams(do_sample=True, seed=2, repetition_penalty=1.3),
        SamplingParams(top_k=3, seed=3),
        SamplingParams(temperature=1.8, top_p=0.5, seed=4),
    ]
    hists = [[1, 2, 3], [4], [5, 5, 6], [], [7]]
    x = _logits(len(params))
    x_before = x.clone()
    out = _run(x, params, hists, top_n=V)
    dummy = torch.zeros(1, 1, dtype=torch.long)
    for i, p in enumerate(params):
        row = x[i : i + 1].clone()
        if p.uses_repetition_penalty:
            row = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(
                torch.tensor([hists[i]]), row
            )
        if not p.is_greedy:
            chain = []
            if p.uses_temperature:
                chain.append(TemperatureLogitsWarper(p.temperature))
            if p.uses_top_k:
                chain.append(TopKLogitsWarper(p.top_k))
            if p.uses_top_p:
                chain.append(TopPLogitsWarper(p.top_p))
            if p.uses_typical_p:
                chain.append(TypicalLogitsWarper(p.typical_p))
            for w in chain:
                row = w(dummy, row)
        ref = torch.log_softmax(row, -1)[0]
        chosen = int(out.next_ids[i])
        assert torch.isfinite(ref[chosen])
        torch.testing.assert_close(out.logprobs[i], ref[chosen])
        sorted_ref = ref.sort(descending=True).values
        torch.testing.assert_close(out.top_logprobs[i], sorted_ref)
        if p.is_greedy:
            assert chosen == int(ref.argmax())
    assert torch.equal(x, x_before)


def _generate(
    params: SamplingParams, others: list[SamplingParams], pos: int, steps: int
) -> list[int]:
    """Sample `steps` tokens for `params` sitting at row `pos` among `others`."""
    all_params = [*others[:pos], params, *others[pos:]]
    samplers = _samplers(all_params)
    ids = []
    for step in range(steps):
        x = _logits(len(all_params), seed=100 + step, scale=1.0)
        # the tracked request always sees the same logits, wherever it sits
        x[pos] = _logits(1, seed=1000 + step, scale=1.0)[0]
        hists = [[1, 2, 3] for _ in all_params]
        ids.append(int(sample(x, samplers, hists).next_ids[pos]))
    return ids


def test_seeded_sampling_reproducible_across_batches() -> None:
    me = SamplingParams(do_sample=True, temperature=0.9, top_p=0.95, seed=1234)
    alone = _generate(me, [], 0, steps=12)
    others = [
        SamplingParams(),
        SamplingParams(do_sample=True, seed=1234),  # same seed, different params
        SamplingParams(temperature=0.5, top_k=10, seed=9),
        SamplingParams(typical_p=0.8, seed=10, repetition_penalty=1.2),
        SamplingParams(frequency_penalty=0.3),
        SamplingParams(top_p=0.7, seed=11),
        SamplingParams(do_sample=True, seed=12, temperature=2.0),
    ]
    assert _generate(me, others, 3, steps=12) == alone
    assert _generate(me, others, 7, steps=12) == alone
    assert _generate(me, list(reversed(others)), 0, steps=12) == alone


def test_different_seeds_differ() -> None:
    a = _generate(SamplingParams(do_sample=True, seed=1), [], 0, steps=20)
    b = _generate(SamplingParams(do_sample=True, seed=2), [], 0, steps=20)
    assert a != b


def test_sampling_respects_filters() -> None:
    x = _logits(1)
    allowed = set(x[0].topk(4).indices.tolist())
    s = [RequestSampler(SamplingParams(top_k=4, seed=5))]
    seen = {int(sample(x, s, [[]]).next_ids[0]) for _ in range(200)}
    assert seen <= allowed and len(seen) > 1


def test_sampling_distribution_matches_softmax() -> None:
    """Empirical frequencies vs softmax probabilities (Pearson chi-square; fixed seeds)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    probs = torch.softmax(logits, -1)
    rows, steps = 1000, 10
    samplers = _samplers([SamplingParams(do_sample=True, seed=s) for s in range(rows)])
    x = logits.expand(rows, -1).contiguous()
    hists = [[] for _ in range(rows)]
    counts = torch.zeros(len(logits))
    for _ in range(steps):
        ids = sample(x, samplers, hists).next_ids
        counts += torch.bincount(ids, minlength=len(logits)).float()
    expected = probs * rows * steps
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # 5 dof, p = 0.001


def test_temperature_distribution() -> None:
    """Temperature 0.5 doubles the logits: frequencies follow softmax(2 * logits)."""
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5])
    probs = torch.softmax(logits / 0.5, -1)
    rows = 4000
    samplers = _samplers([SamplingParams(temperature=0.5, seed=s) for s in range(rows)])
    ids = sample(logits.expand(rows, -1).contiguous(), samplers, [[]] * rows).next_ids
    counts = torch.bincount(ids, minlength=4).float()
    expected = probs * rows
    assert float(((counts - expected) ** 2 / expected).sum()) < 16.3  # 3 dof, p = 0.001


def test_sampling_distribution_across_vocab_blocks() -> None:
    """A vocabulary spanning several draw blocks (and a padded tail) samples correctly."""
    v = 3000
    ids = torch.tensor([3, 1023, 1024, 2050, 2999])
    logits = torch.full((v,), float("-inf"))
    logits[ids] = torch.tensor([0.5, 1.0, 0.0, -0.5, 0.7])
    probs = torch.softmax(logits[ids], -1)
    rows = 3000
    samplers = _samplers([SamplingParams(do_sample=True, seed=s) for s in range(rows)])
    drawn = sample(logits.expand(rows, -1).contiguous(), samplers, [[]] * rows).next_ids
    assert torch.isin(drawn, ids).all()
    counts = torch.stack([(drawn == i).sum() for i in ids]).float()
    expected = probs * rows
    assert float(((counts - expected) ** 2 / expected).sum()) < 18.5  # 4 dof, p = 0.001


def test_invert_edges_never_pick_zero_weights() -> None:
    from shard.sampling.draw import invert

    w = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]], dtype=torch.float64).expand(3, -1)
    u = torch.tensor([[0.0], [0.5], [torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))]])
    idx, rem = invert(w, u.double())
    assert idx.tolist() == [1, 3, 3]
    assert (rem >= 0).all() and (rem <= 0.5).all()


@pytest.mark.parametrize("n_greedy", [1, 7])  # untouched rows copied out / read in place
def test_untouched_rows_with_few_or_many_touched(n_greedy: int) -> None:
    params = [SamplingParams(repetition_penalty=1.5), SamplingParams(top_k=1, seed=3)]
    params += [SamplingParams()] * n_greedy
    hists = [[0, 1, 2]] + [[]] * (len(params) - 1)
    x = _logits(len(params))
    out = _run(x, params, hists, top_n=4)
    ref = x.clone()
    ref[0, :3] = torch.where(ref[0, :3] < 0, ref[0, :3] * 1.5, ref[0, :3] / 1.5)
    ref[1] = torch.where(ref[1] < ref[1].max(), float("-inf"), ref[1])
    ref_lp = torch.log_softmax(ref, -1)
    assert torch.equal(out.next_ids, ref.argmax(-1))
    torch.testing.assert_close(out.logprobs, ref_lp.max(-1).values)
    top = ref_lp.topk(4)
    assert torch.equal(
        out.top_ids[[0, *range(2, len(params))]], top.indices[[0, *range(2, len(params))]]
    )
    torch.testing.assert_close(out.top_logprobs, top.values)


def test_bf16_logits_and_empty_history() -> None:
    x = _logits(2).to(torch.bfloat16)
    params = [SamplingParams(frequency_penalty=1.0, repetition_penalty=1.2), SamplingParams()]
    out = _run(x, params, [[], [5]])
    ref = torch.log_softmax(x.float(), -1)
    assert out.logprobs.dtype == torch.float32
    assert torch.equal(out.next_ids, ref.argmax(-1))
    torch.testing.assert_close(out.logprobs, ref.max(-1).values)


def test_row_chunking_gives_identical_results(monkeypatch: pytest.MonkeyPatch) -> None:
    import shard.sampling.sampler as sampler_mod

    params = [
        SamplingParams(seed=i, do_sample=i % 2 == 0, top_p=0.9 if i % 3 else 1.0) for i in range(11)
    ]
    x = _logits(len(params))
    hists = [[i, i + 1] for i in range(len(params))]
    whole = _run(x, params, hists, top_n=3)
    monkeypatch.setattr(sampler_mod, "_CHUNK_ELEMS", 3 * V)  # chunks of 3 rows
    chunked = _run(x, params, hists, top_n=3)
    for name in ("next_ids", "logprobs", "top_ids", "top_logprobs"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name


# ---------------------------------------------------------------- numerical guard

NAN, INF = float("nan"), float("inf")


def _assert_as_alone(out: SampleOutput, x, params, hists, rows, top_n: int) -> None:
    """Rows `rows` of a batch output equal each row sampled alone (fresh samplers, same seed)."""
    for i in rows:
        alone = _run(x[i : i + 1], [params[i]], [hists[i]], top_n=top_n)
        assert int(out.next_ids[i]) == int(alone.next_ids[0]), i
        assert torch.equal(out.logprobs[i], alone.logprobs[0]), i
        assert torch.equal(out.top_ids[i], alone.top_ids[0]), i
        assert torch.equal(out.top_logprobs[i], alone.top_logprobs[0]), i


def _assert_no_nan(out: SampleOutput, rows=None) -> None:
    rows = slice(None) if rows is None else list(rows)
    assert not out.logprobs[rows].isnan().any()
    assert not out.top_logprobs[rows].isnan().any()


@pytest.mark.parametrize("negative", [False, True])  # all-negative row: overflows to -inf
@pytest.mark.parametrize("warpers", [{}, {"top_k": 50, "top_p": 0.9, "typical_p": 0.9}])
def test_tiny_temperature_takes_the_argmax_and_spares_the_batch(negative, warpers) -> None:
    params = [
        SamplingParams(),
        SamplingParams(do_sample=True, seed=7, top_p=0.9),
        SamplingParams(temperature=1e-38, do_sample=True, seed=8, **warpers),
    ]
    x = _logits(3)
    if negative:
        x[2] = -x[2].abs() - 4.0  # even its max / 1e-38 is -inf
    hists = [[], [], []]
    x_before = x.clone()
    out = _run(x, params, hists, top_n=5)
    _assert_as_alone(out, x, params, hists, rows=(0, 1), top_n=5)
    assert int(out.next_ids[2]) == int(x[2].argmax())  # the limit of temperature -> 0
    assert float(out.logprobs[2]) == 0.0
    assert out.top_ids[2, 0] == out.next_ids[2] and (out.top_logprobs[2, 1:] == -INF).all()
    _assert_no_nan(out)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("do_sample", [True, False])
def test_tiny_repetition_penalty_takes_the_best_overflowed_token(do_sample: bool) -> None:
    x = _logits(3)
    best, second = x[2].topk(2).indices.tolist()
    assert float(x[2, second]) > 3.5  # / 1e-38 overflows too: the logits break the tie
    params = [
        SamplingParams(),
        SamplingParams(do_sample=True, seed=7, repetition_penalty=1.3),
        SamplingParams(repetition_penalty=1e-38, do_sample=do_sample, seed=9),
    ]
    hists = [[], [1, 2, 3], [second, int(x[2].argmin()), best, 5]]
    out = _run(x, params, hists, top_n=5)
    _assert_as_alone(out, x, params, hists, rows=(0, 1), top_n=5)
    assert int(out.next_ids[2]) == best
    assert float(out.logprobs[2]) == 0.0
    _assert_no_nan(out)


def test_nan_and_inf_logits_rows_spare_the_batch() -> None:
    """Simulated model failures: NaN entries -> -inf, +inf entries share the mass."""
    params = [
        SamplingParams(),
        SamplingParams(do_sample=True, seed=7, top_k=20),
        SamplingParams(do_sample=True, seed=8, top_p=0.9),  # some NaN
        SamplingParams(temperature=0.5, seed=9),  # all NaN: uniform
        SamplingParams(repetition_penalty=1.2),  # greedy, penalized, some NaN
        SamplingParams(do_sample=True, seed=10, top_k=5),  # two +inf and a NaN
        SamplingParams(),  # untouched greedy, all NaN: not guarded, still in range
    ]
    hists = [[], [], [4], [], [5, 6], [], []]
    x = _logits(len(params))
    x[2, ::3] = NAN
    x[3] = NAN
    x[4, 5::7] = NAN
    x[5, [10, 20]] = INF
    x[5, 30] = NAN
    x[6] = NAN
    x_before = x.clone()
    out = _run(x, params, hists, top_n=5)
    assert ((out.next_ids >= 0) & (out.next_ids < V)).all()
    _assert_as_alone(out, x, params, hists, rows=(0, 1), top_n=5)
    cleaned = x.nan_to_num(nan=-INF, posinf=INF)  # what rows 2 and 4 must be sampled from
    _assert_as_alone(out, cleaned, params, hists, rows=(2, 4), top_n=5)
    torch.testing.assert_close(out.logprobs[3], torch.tensor(-float(torch.tensor(V).log())))
    assert int(out.next_ids[5]) in (10, 20)
    torch.testing.assert_close(out.logprobs[5], torch.tensor(0.5).log())
    _assert_no_nan(out, rows=range(6))
    assert torch.equal(x.nan_to_num(), x_before.nan_to_num()), "logits must not change"


def test_draw_never_returns_out_of_range_ids() -> None:
    from shard.sampling.draw import draw

    v = 1500  # two draw blocks, the second padded
    probs = torch.softmax(_logits(4, v=v), -1)
    probs[0] = NAN
    probs[1] = 0.0
    probs[2] = 0.0
    probs[2, 700], probs[2, 1200] = 0.3, NAN
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    ids = draw(probs, gens)
    assert ids.tolist()[:3] == [0, 0, 700]  # argmax, NaN counting as 0
    alone = draw(probs[3:], [torch.Generator().manual_seed(3)])
    assert int(ids[3]) == int(alone[0])
    # every generator advanced by exactly one uniform, drawn or not
    fresh = torch.Generator().manual_seed(0)
    torch.empty(1, dtype=torch.float64).uniform_(generator=fresh)
    assert torch.equal(torch.rand(2, generator=gens[0]), torch.rand(2, generator=fresh))
