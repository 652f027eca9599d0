"""Per-request next-token choice for a batch (TGI's HeterogeneousNextTokenChooser semantics).

Per row, in order:
  1. watermark (rows that set it): a green list seeded by the previous token gets +delta,
  2. repetition penalty and frequency penalty (every row that sets them),
  3. warpers temperature -> top_k -> top_p -> typical_p (only rows that sample),
  4. greedy rows take the argmax, sampling rows draw from the softmax with their own
     seeded generator, so a request's tokens depend only on its seed and its logits,
     never on the other rows of the batch.
Logprobs are the log_softmax of the final (penalized, warped) scores.

Each processor runs once per step on just the rows that need it, with per-row
parameters as tensors; only the random draw loops over sampling rows.

Numerical guard: one request's parameters must never poison its neighbours. Tiny but
valid values (temperature or repetition_penalty 1e-38: 20 / 1e-38 = 2e39 > f32 max)
overflow a row to +inf, and a failing model can emit NaN; softmax turns such a row into
NaN and the inverse-CDF draw would index out of range, failing the whole batch. So after
the penalties, before the warpers, one max per touched row (`logits_guard.py`) flags rows with
NaN, +inf or no finite entry, or whose max the temperature would overflow, and only
those rows are rewritten:
  - a row with +inf entries keeps the +inf tokens of highest unprocessed logit, equally
    likely (0.0), and everything else becomes -inf: the limit the overflow approached
    (the repetition penalty divides all seen tokens by one p, so it keeps their order;
    +inf straight from the model ties them all);
  - NaN entries become -inf;
  - a row left with no finite entry falls back to the request's unprocessed logits row,
    repaired alike, and to uniform (all 0.0) when even that has none;
  - a row the temperature would overflow becomes its exact limit: its argmax(es) 0.0,
    everything else -inf.
The warpers then cannot create NaN or +inf (they only write -inf and keep a token), so
there is no second check after them; the draw (shard/sampling/draw.py), the last line of defence,
takes the argmax of a row whose probabilities are NaN or sum to zero instead of indexing out
of range.
Repaired rows have finite or -inf logprobs, never NaN; healthy rows give exactly the same
tokens and logprobs as without the guard. The all-greedy fast path and the untouched
greedy rows of a mixed batch are not checked (a NaN there still yields an in-range id).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shard.sampling import logits_processors as lp
from shard.sampling.draw import draw
from shard.sampling.logits_guard import guard_rows
from shard.sampling.watermark import DEFAULT_WATERMARK, Watermark


@dataclass(frozen=True)
class SamplingParams:
    """A request's NextTokenChooserParameters; zero values from the proto mean "unset"."""

    temperature: float = 1.0  # 0 or 1.0: no temperature warp
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0 or 0: off
    typical_p: float = 1.0  # 1.0 or 0: off
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0  # 1.0 or 0: off
    frequency_penalty: float = 0.0
    watermark: bool = False

    @classmethod
    def from_proto(cls, msg: Any) -> SamplingParams:
        """Build from a generate.proto NextTokenChooserParameters (or anything alike)."""
        return cls(
            temperature=float(msg.temperature),
            top_k=int(msg.top_k),
            top_p=float(msg.top_p),
            typical_p=float(msg.typical_p),
            do_sample=bool(msg.do_sample),
            seed=int(msg.seed),
            repetition_penalty=float(msg.repetition_penalty),
            frequency_penalty=float(msg.frequency_penalty),
            watermark=bool(msg.watermark),
        )

    @property
    def uses_temperature(self) -> bool:
        return self.temperature > 0 and self.temperature != 1.0

    @property
    def uses_top_k(self) -> bool:
        return self.top_k > 0

    @property
    def uses_top_p(self) -> bool:
        return 0 < self.top_p < 1.0

    @property
    def uses_typical_p(self) -> bool:
        return 0 < self.typical_p < 1.0

    @property
    def uses_repetition_penalty(self) -> bool:
        return self.repetition_penalty > 0 and self.repetition_penalty != 1.0

    @property
    def uses_frequency_penalty(self) -> bool:
        return self.frequency_penalty != 0.0

    @property
    def has_warpers(self) -> bool:
        return self.uses_temperature or self.uses_top_k or self.uses_top_p or self.uses_typical_p

    @property
    def is_greedy(self) -> bool:
        """No sampling: do_sample is off and no warper is set (a warper turns sampling on)."""
        return not (self.do_sample or self.has_warpers)


class RequestSampler:
    """One request's sampling state; it lives as long as the request, across batch changes.

    The flags and effective parameters are resolved once here so the per-step batch
    assembly in `sample` is only attribute reads.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.sampling = not params.is_greedy
        self.generator: torch.Generator | None = None  # CPU: one uniform per step
        if self.sampling:
            self.generator = torch.Generator().manual_seed(params.seed)
        # Effective values; None means "off".
        self.rep_penalty = params.repetition_penalty if params.uses_repetition_penalty else None
        self.freq_penalty = params.frequency_penalty if params.uses_frequency_penalty else None
        self.penalized = self.rep_penalty is not None or self.freq_penalty is not None
        self.watermarked = params.watermark
        self.temperature = params.temperature if params.uses_temperature else None
        self.top_k = params.top_k if params.uses_top_k else None
        self.top_p = params.top_p if params.uses_top_p else None
        self.typical_p = params.typical_p if params.uses_typical_p else None


@dataclass
class SampleOutput:
    next_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32: logprob of next_ids under the final distribution
    top_ids: torch.Tensor | None = None  # [B, n] int64 when top_n > 0, by logprob descending
    top_logprobs: torch.Tensor | None = None  # [B, n] float32


def sample(
    logits: torch.Tensor,
    samplers: Sequence[RequestSampler],
    histories: Sequence[Sequence[int]],
    top_n: int = 0,
    watermark: Watermark = DEFAULT_WATERMARK,
) -> SampleOutput:
    """Choose the next token of every row. logits [B, V]; histories: prompt + generated ids.

    `logits` is never modified. Rows that neither sample, penalize nor watermark are read
    in place. `watermark` holds gamma/delta for the rows whose params set `watermark`.
    """
    scores = logits.float()  # [B, V]
    touched = [i for i, s in enumerate(samplers) if s.sampling or s.penalized or s.watermarked]
    if not touched:  # fast path: all greedy, no penalties, no watermark
        return _choose(scores, top_n)
    sub = [samplers[i] for i in touched]
    sub_histories = [histories[i] for i in touched]
    x = scores[touched]  # [T, V] copy of the rows we modify
    x = _watermark(x, sub, sub_histories, watermark)
    x = _penalize(x, sub, sub_histories)
    temperature = None
    if any(t.temperature is not None for t in sub):
        temperature = _param_or(sub, "temperature", 1.0, x.device)  # [T]
    x = guard_rows(x, scores, touched, temperature)  # NaN / +inf, the temperature's overflow
    drawn = [j for j, s in enumerate(sub) if s.sampling]
    if drawn:
        x = _apply_rows(x, drawn, _warp, [sub[j] for j in drawn])
    out_t = _choose(x, top_n, drawn, [sub[j].generator for j in drawn])
    if len(touched) == len(samplers):
        return out_t
    return _merge(_choose_untouched(scores, touched, top_n), touched, out_t)


# _choose works on row chunks of about this many elements (float32: 2 MB, an L2 cache),
# so its several passes over a chunk hit cache instead of memory: ~2x at B=256.
_CHUNK_ELEMS = 1 << 19


def _choose(
    scores: torch.Tensor,
    top_n: int,
    drawn: Sequence[int] = (),
    generators: Sequence[torch.Generator | None] = (),
) -> SampleOutput:
    """Argmax (or a draw for the sorted rows `drawn`), logprobs, top-n; scores [R, V]."""
    rows, vocab = scores.shape
    step = max(1, _CHUNK_ELEMS // vocab)
    if rows <= step:
        return _choose_chunk(scores, top_n, drawn, generators)
    parts = []
    for start in range(0, rows, step):
        lo, hi = bisect.bisect_left(drawn, start), bisect.bisect_left(drawn, start + step)
        chunk_drawn = [j - start for j in drawn[lo:hi]]
        parts.append(
            _choose_chunk(scores[start : start + step], top_n, chunk_drawn, generators[lo:hi])
        )
    return _cat(parts)


def _choose_chunk(
    scores: torch.Tensor,
    top_n: int,
    drawn: Sequence[int],
    generators: Sequence[torch.Generator | None],
) -> SampleOutput:
    """_choose on one chunk of rows, scores [C, V].

    Built on log_softmax/softmax: their kernels stay fast on -inf (filtered) entries,
    where exp() and logsumexp() take a slow path.
    """
    logprobs_all = torch.log_softmax(scores, dim=-1)  # [C, V]
    logprobs, next_ids = logprobs_all.max(dim=-1)  # [C]; max() is faster than argmax() on CPU
    if drawn:
        next_ids[drawn] = draw(scores[drawn].softmax(dim=-1), generators)
        logprobs = logprobs_all.gather(1, next_ids.unsqueeze(1)).squeeze(1)
    out = SampleOutput(next_ids=next_ids, logprobs=logprobs)
    if top_n > 0:
        top = torch.topk(logprobs_all, min(top_n, scores.size(1)), dim=-1)  # sorted descending
        out.top_ids, out.top_logprobs = top.indices, top.values
    return out


def _cat(parts: list[SampleOutput]) -> SampleOutput:
    """Concatenate the outputs of consecutive row chunks."""

    def cat(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if ts[0] is None else torch.cat(ts)  # type: ignore[arg-type]

    return SampleOutput(
        torch.cat([p.next_ids for p in parts]),
        torch.cat([p.logprobs for p in parts]),
        cat([p.top_ids for p in parts]),
        cat([p.top_logprobs for p in parts]),
    )


def _choose_untouched(scores: torch.Tensor, touched: list[int], top_n: int) -> SampleOutput:
    """Greedy choice for the rows not in `touched`, as a [B]-row output (touched rows junk).

    Either run over the whole batch (wasted work on the touched rows) or copy the
    untouched rows out first (a copy of those); pick whichever moves less memory.
    """
    batch = scores.size(0)
    if 2 * len(touched) < batch:
        return _choose(scores, top_n)
    skip = set(touched)
    rest = torch.tensor([i for i in range(batch) if i not in skip], device=scores.device)  # [U]
    out_u = _choose(scores[rest], top_n)
    return _merge(_empty_output(batch, out_u), rest, out_u)


def _empty_output(batch: int, like: SampleOutput) -> SampleOutput:
    def grow(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.new_empty((batch, *t.shape[1:]))

    return SampleOutput(
        grow(like.next_ids), grow(like.logprobs), grow(like.top_ids), grow(like.top_logprobs)
    )


def _merge(out: SampleOutput, rows: list[int] | torch.Tensor, part: SampleOutput) -> SampleOutput:
    """Write `part` (one row per entry of rows) into those rows of `out`, in place."""
    out.next_ids[rows] = part.next_ids
    out.logprobs[rows] = part.logprobs
    if out.top_ids is not None and part.top_ids is not None and out.top_logprobs is not None:
        out.top_ids[rows] = part.top_ids
        out.top_logprobs[rows] = part.top_logprobs
    return out


def _apply_rows(x: torch.Tensor, rows: list[int], fn: Callable, *args: Any) -> torch.Tensor:
    """fn(x[rows], *args) written back into x [R, V]; no gather when rows are all of x."""
    if len(rows) == x.size(0):
        return fn(x, *args)
    x[rows] = fn(x[rows], *args)
    return x


def _param(samplers: Sequence[RequestSampler], name: str, device: torch.device) -> torch.Tensor:
    """One parameter of every sampler as a tensor [R]."""
    return torch.tensor([getattr(s, name) for s in samplers], device=device)


def _watermark(
    x: torch.Tensor,
    samplers: list[RequestSampler],
    histories: list[Sequence[int]],
    watermark: Watermark,
) -> torch.Tensor:
    """Watermark, in place, the rows of x [T, V] that set it and have a previous token."""
    rows = [j for j, s in enumerate(samplers) if s.watermarked and histories[j]]
    if not rows:
        return x
    prev = [histories[j][-1] for j in rows]  # [W]
    return _apply_rows(x, rows, watermark.apply, prev)


def _penalize(
    x: torch.Tensor, samplers: list[RequestSampler], histories: list[Sequence[int]]
) -> torch.Tensor:
    """Repetition then frequency penalty, in place, on the rows of x [T, V] that set them.

    Only the (row, token) pairs of the penalized rows' histories are read and written;
    rows without one of the penalties get its neutral value (1.0 / 0.0).
    """
    rows = [j for j, s in enumerate(samplers) if s.penalized]
    if not rows:
        return x
    hist_rows, ids = lp.history_index([histories[j] for j in rows], x.size(1))  # [N], [N]
    hist_rows = torch.tensor(rows)[hist_rows].to(x.device)  # rows of x
    ids = ids.to(x.device)
    if any(s.rep_penalty is not None for s in samplers):
        penalty = _param_or(samplers, "rep_penalty", 1.0, x.device)  # [T]
        x = lp.apply_repetition_penalty(x, hist_rows, ids, penalty)
    if any(s.freq_penalty is not None for s in samplers):
        penalty = _param_or(samplers, "freq_penalty", 0.0, x.device)  # [T]
        lengths = torch.tensor([len(h) for h in histories], device=x.device)  # [T]
        x = lp.apply_frequency_penalty(x, hist_rows, ids, lengths, penalty)
    return x


def _param_or(
    samplers: Sequence[RequestSampler], name: str, default: float, device: torch.device
) -> torch.Tensor:
    """One parameter of every sampler as a float32 tensor [R], `default` where it is off."""
    values = [getattr(s, name) for s in samplers]
    return torch.tensor([default if v is None else v for v in values], device=device)


_WARPERS = (
    ("temperature", lp.apply_temperature),
    ("top_k", lp.apply_top_k),
    ("top_p", lp.apply_top_p),
    ("typical_p", lp.apply_typical_p),
)


def _warp(x: torch.Tensor, samplers: list[RequestSampler]) -> torch.Tensor:
    """Apply the warpers, in order, to the rows of x [S, V] that set them (in place)."""
    for name, fn in _WARPERS:
        rows = [j for j, s in enumerate(samplers) if getattr(s, name) is not None]
        if rows:
            param = _param([samplers[j] for j in rows], name, x.device)  # [R]
            x = _apply_rows(x, rows, fn, param)
    return x
