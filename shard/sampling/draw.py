"""The draw of sampling rows: one id per row of probabilities by inverse CDF, each row with
its own seeded generator, so a request's tokens depend only on its seed and its logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shard.sampling import logits_processors as lp

_DRAW_BLOCK = 1024  # vocabulary block size of the two-level inverse-CDF draw


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Sample one id per row of probs [S, V] by inverse CDF, each row with its generator.

    Each row takes exactly one uniform from its own generator per step, so its tokens do
    not depend on the rest of the batch. The CDF is two-level (cumsum over per-block
    sums, then within the chosen block) in float64: accurate for a 150k vocabulary
    without a slow float64 cumsum over every token. Zero-probability tokens are never
    chosen. A row whose probabilities are NaN, infinite or sum to zero (which the guard
    in `sample` should have prevented) takes its argmax instead, NaN counting as 0:
    never an out-of-range id, and the generator still advances by one.
    """
    u = torch.empty(len(generators), 1, dtype=torch.float64)  # [S, 1]
    for j, gen in enumerate(generators):
        u[j].uniform_(generator=gen)
    u = u.to(probs.device)
    blocks = blocked(probs)  # [S, nb, blk]
    block_sums = blocks.sum(dim=-1).to(torch.float64)  # [S, nb]
    total = block_sums.sum(dim=-1)  # [S]
    ok = torch.isfinite(total) & (total > 0)  # [S]
    if not lp.branches_ok(probs):  # no sync: every row drawn from safe weights, then chosen
        drawn = draw_blocks(
            blocks.masked_fill(~ok[:, None, None], 1.0),
            block_sums.masked_fill(~ok[:, None], 1.0),
            u,
        )
        return torch.where(ok, drawn, probs.nan_to_num(nan=0.0).argmax(dim=-1))
    if bool(ok.all()):
        return draw_blocks(blocks, block_sums, u)
    ids = probs.nan_to_num(nan=0.0).argmax(dim=-1)  # [S]: the fallback, for the bad rows
    good = ok.nonzero().squeeze(1)  # [G]
    if good.numel():
        ids[good] = draw_blocks(blocks[good], block_sums[good], u[good])
    return ids


def draw_blocks(blocks: torch.Tensor, block_sums: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The two-level inverse CDF: blocks [S, nb, blk], block_sums [S, nb] (positive total,
    float64), u [S, 1] uniforms -> ids [S]."""
    block, rem = invert(block_sums, u)  # [S], [S, 1]
    inner = blocks[torch.arange(blocks.size(0), device=blocks.device), block]  # [S, blk]
    offset, _ = invert(inner.to(torch.float64), rem / block_sums.gather(1, block[:, None]))
    return block * blocks.size(2) + offset


def invert(weights: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse CDF of weights [S, N] (non-negative, positive sum) at u [S, 1] in [0, 1).

    Returns the chosen index [S] (always a positive weight) and the mass left within it,
    target - cdf_before [S, 1], for a second-level draw.
    """
    cdf = weights.cumsum(dim=-1)  # [S, N]
    total = cdf[:, -1:]  # [S, 1]
    # Strictly below the total, so the search never runs past the last positive weight.
    target = torch.minimum(u * total, torch.nextafter(total, cdf.new_zeros(())))
    idx = torch.searchsorted(cdf, target, right=True)  # [S, 1]: first cdf > target
    before = cdf.gather(1, idx) - weights.gather(1, idx)  # [S, 1]
    return idx.squeeze(1), (target - before).clamp_min_(0)


def blocked(probs: torch.Tensor) -> torch.Tensor:
    """probs [S, V] as [S, nb, blk] blocks, zero-padded at the end when V % blk != 0."""
    pad = -probs.size(1) % _DRAW_BLOCK
    if pad:
        probs = torch.nn.functional.pad(probs, (0, pad))
    return probs.view(probs.size(0), -1, _DRAW_BLOCK)
