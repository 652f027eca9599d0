"""Per-row numeric guard of the sampler: one request's sampling parameters (a temperature or
repetition penalty so small the logits overflow) or NaN logits must never fail the batch.
`guard_rows` finds such rows with one reduction each and repairs only them; the rule is in
`_repair` and `_temperature_limit`. Off the CPU, where finding them would be a host sync, every
row goes through the repair and only the flagged ones take its result (`_guard_every_row`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shard.sampling import logits_processors as lp

_NEG_INF = float("-inf")


def guard_rows(
    x: torch.Tensor,
    raw: torch.Tensor,
    raw_rows: Sequence[int],
    temperature: torch.Tensor | None = None,
) -> torch.Tensor:
    """Make the rows of x [T, V] safe for the warpers and softmax, in place.

    One request's NaN or +inf (model failure, repetition_penalty 1e-38), or a temperature
    overflowing its row, would make softmax NaN and the draw fail for the whole batch.
    One max per row finds them all (max propagates NaN, is +inf with any +inf, -inf with
    nothing finite, and x / t overflows iff max / t does), so a healthy row costs one
    reduction and the rest runs on the flagged rows only. raw [B, V]: the unprocessed
    logits, row raw_rows[i] for row i of x, the fallback of _repair (which has the rule);
    temperature [T]: each row's (1.0 where off), None when no row has one.
    """
    if not lp.branches_ok(x):
        return _guard_every_row(x, raw, raw_rows, temperature)
    peak = x.amax(dim=-1)  # [T]
    bad = (~torch.isfinite(peak)).nonzero().squeeze(1)  # [X]
    if bad.numel():
        fixed = _repair(x[bad], raw[torch.tensor(raw_rows, device=x.device)[bad]])  # [X, V]
        x[bad] = fixed
        peak[bad] = fixed.amax(dim=-1)
    if temperature is not None:
        _temperature_limit(x, peak, temperature)
    return x


def _guard_every_row(
    x: torch.Tensor,
    raw: torch.Tensor,
    raw_rows: Sequence[int],
    temperature: torch.Tensor | None,
) -> torch.Tensor:
    """guard_rows without a host sync: the same rule, computed for every row and selected."""
    peak = x.amax(dim=-1)  # [T]
    bad = ~torch.isfinite(peak)  # [T]
    fallback = raw[torch.tensor(raw_rows, device=x.device)]  # [T, V]
    fixed = _overflow_limit(x.clone(), fallback)
    empty = fixed.amax(dim=-1, keepdim=True) == _NEG_INF  # [T, 1]
    alt = _overflow_limit(fallback.clone(), fallback)
    alt = alt.masked_fill(alt.amax(dim=-1, keepdim=True) == _NEG_INF, 0.0)
    fixed = torch.where(empty, alt, fixed)
    x = torch.where(bad[:, None], fixed, x)
    if temperature is not None:
        peak = x.amax(dim=-1)  # [T]
        over = ~torch.isfinite(peak / temperature.to(x.dtype))  # [T]
        limit = torch.full_like(x, _NEG_INF).masked_fill_(x == peak[:, None], 0.0)
        x = torch.where(over[:, None], limit, x)
    return x


def _temperature_limit(x: torch.Tensor, peak: torch.Tensor, temperature: torch.Tensor) -> None:
    """Replace, in place, the rows of x [T, V] the temperature [T] would overflow.

    x / t (t = 1e-38: 20 / 1e-38 = 2e39) is +inf, or nothing in the row stays finite,
    exactly when peak / t is (peak [T]: the row max; division by t > 0 is correctly
    rounded, so monotone). The exact limit of such a row is its argmax(es) at 0.0 and -inf
    elsewhere: any other token is lower by more than float32 can hold. The division in
    lp.apply_temperature then leaves it as it is.
    """
    over = (~torch.isfinite(peak / temperature.to(x.dtype))).nonzero().squeeze(1)  # [O]
    if over.numel():
        rows = x[over]  # [O, V]
        x[over] = torch.full_like(rows, _NEG_INF).masked_fill_(rows == peak[over, None], 0.0)


def _repair(x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """Repair rows x [X, V] (in place) given their unprocessed logits raw [X, V] (a copy).

    +inf tokens: the limit of the overflow, keeping those the model ranks highest (the
    repetition penalty divides every seen token by the same p, so their order is raw's);
    NaN -> -inf; a row then without a finite entry takes raw, repaired alike, or else
    uniform (0.0 everywhere) if the model's own row has nothing finite either.
    """
    x = _overflow_limit(x, raw)
    empty = x.amax(dim=-1) == _NEG_INF  # [X]: nothing finite left
    if bool(empty.any()):
        alt = raw[empty]  # [E, V]
        alt = _overflow_limit(alt, alt.clone())
        alt[alt.amax(dim=-1) == _NEG_INF] = 0.0
        x[empty] = alt
    return x


def _overflow_limit(x: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """x [X, V] in place: NaN -> -inf; in a row with +inf entries only the +inf tokens
    of largest key [X, V] stay, as 0.0 (equally likely), and everything else is -inf."""
    pos = torch.isposinf(x)  # [X, V]
    best = key.masked_fill(~pos, _NEG_INF).amax(dim=-1, keepdim=True)  # [X, 1]
    top = pos & (key == best)  # [X, V]: the +inf tokens that keep the mass
    overflowed = pos.any(dim=-1, keepdim=True)  # [X, 1]
    x.masked_fill_(x.isnan() | (overflowed & ~top), _NEG_INF)
    return x.masked_fill_(top, 0.0)
