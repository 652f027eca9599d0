"""Batched logits processors with per-row parameters.

Every function takes `scores` float32 [R, V] and one parameter per row as a tensor, so
rows with different settings are handled in one vectorized call. The warpers get only
the rows that use them (the caller indexes them); the penalties touch only the
(row, token) pairs of the histories, so they can run on a larger batch in place. They match the
transformers processors of the same name applied row by row (min_tokens_to_keep=1,
filter_value=-inf):

  apply_repetition_penalty   RepetitionPenaltyLogitsProcessor
  apply_frequency_penalty    TGI's HeterogeneousFrequencyPenaltyLogitsProcessor
  apply_temperature          TemperatureLogitsWarper
  apply_top_k                TopKLogitsWarper
  apply_top_p                TopPLogitsWarper
  apply_typical_p            TypicalLogitsWarper

The functions may modify `scores` in place and return the result.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

FILTER_VALUE = float("-inf")


def branches_ok(t: torch.Tensor) -> bool:
    """Whether code may branch on t's values. On the CPU that is free, and skipping work on the
    rows that need none pays; on an accelerator each such branch (`nonzero`, `bool(...)`) is a
    host sync that stalls the stream, so there the sampler takes branch-free paths that treat
    every row alike (and give the same results; the tests run both)."""
    return t.is_cpu


# apply_top_p looks for the cut among this many best tokens first (see there).
TOP_P_PREFIXES = (256, 4096)


def history_index(
    histories: Sequence[Sequence[int]], vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (row, token id) occurrence of the histories, flattened: rows [N], ids [N].

    Ids outside [0, vocab_size) (e.g. from a tokenizer larger than the logits) are dropped.
    """
    lengths = torch.tensor([len(h) for h in histories], dtype=torch.int64)  # [R]
    ids = torch.tensor(list(itertools.chain.from_iterable(histories)), dtype=torch.int64)  # [N]
    rows = torch.repeat_interleave(torch.arange(len(histories)), lengths)  # [N]
    valid = (ids >= 0) & (ids < vocab_size)
    if not bool(valid.all()):
        ids, rows = ids[valid], rows[valid]
    return rows, ids


def apply_repetition_penalty(
    scores: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """HF repetition penalty on the tokens seen in each row's history.

    scores [R, V]; rows, ids [N] from history_index (repeats are fine); penalty [R]
    (1.0 leaves a row unchanged): score < 0 -> score * p, else score / p.
    """
    seen = scores[rows, ids]  # [N]
    p = penalty.to(scores.dtype)[rows]  # [N]
    scores[rows, ids] = torch.where(seen < 0, seen * p, seen / p)
    return scores


def apply_frequency_penalty(
    scores: torch.Tensor,
    rows: torch.Tensor,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    penalty: torch.Tensor,
) -> torch.Tensor:
    """scores -= penalty * count(token in history) / len(history), row by row.

    scores [R, V]; rows, ids [N] from history_index; lengths [R] history lengths;
    penalty [R] (0.0 leaves a row unchanged). Each occurrence subtracts penalty / len.
    """
    scale = penalty.to(scores.dtype) / lengths.to(scores.dtype).clamp_min(1)  # [R]
    return scores.index_put_((rows, ids), -scale[rows], accumulate=True)


def apply_temperature(scores: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """scores [R, V] / temperature [R]."""
    return scores.div_(temperature.to(scores.dtype).unsqueeze(1))


def apply_top_k(scores: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep the top_k [R] (>= 1) highest scores per row; ties with the k-th are kept."""
    vocab = scores.size(1)
    k = top_k.clamp(1, vocab)  # [R]
    max_k = int(k.max())
    top_values = torch.topk(scores, max_k, dim=1).values  # [R, max_k], sorted descending
    kth = top_values.gather(1, (k - 1).unsqueeze(1))  # [R, 1]
    return scores.masked_fill_(scores < kth, FILTER_VALUE)


def apply_top_p(
    scores: torch.Tensor, top_p: torch.Tensor, prefixes: Sequence[int] = TOP_P_PREFIXES
) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of top tokens with mass >= top_p [R].

    Looks for the cut among the best `prefixes[0]` tokens first (a top-k, much cheaper
    than sorting the vocabulary), then the next prefix for the rows whose cut lies
    further; only rows beyond every prefix sort the whole row.
    """
    rows, vocab = scores.shape
    remove = torch.ones_like(scores, dtype=torch.bool)  # [R, V]
    pending = torch.arange(rows, device=scores.device)  # rows still without a cut
    if not branches_ok(scores):  # a full sort is cheap there, and needs no sync
        return scores.masked_fill_(_top_p_remove_sorted(scores, top_p), FILTER_VALUE)
    # softmax's kernel is fast on -inf; exp()/logsumexp() take a slow path on them.
    probs = scores.softmax(dim=-1)  # [R, V]
    for k in prefixes:
        if k >= vocab or not pending.numel():
            break
        sub = probs if pending.numel() == rows else probs[pending]  # [P, V]
        top_idx, keep, covered = _top_p_prefix(sub, top_p[pending], k)
        done = covered.nonzero().squeeze(1)  # [D]
        remove[pending[done]] = remove.new_ones(done.numel(), vocab).scatter_(
            1, top_idx[done], ~keep[done]
        )
        pending = pending[~covered]
    if pending.numel():
        remove[pending] = _top_p_remove_sorted(scores[pending], top_p[pending])
    return scores.masked_fill_(remove, FILTER_VALUE)


def _top_p_prefix(
    probs: torch.Tensor, top_p: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-p among the k most likely tokens of probs [P, V].

    Returns their ids [P, k], which of them to keep [P, k] (descending order), and
    whether the cut lies inside the prefix [P] (otherwise the keep mask is incomplete).
    """
    p = top_p.to(probs.dtype).unsqueeze(1)  # [P, 1]
    top, top_idx = torch.topk(probs, k, dim=1)  # [P, k] descending
    cum = top.cumsum(dim=-1)  # [P, k]
    keep = (cum - top) < p  # the mass strictly above a token is < top_p -> keep it
    keep[:, 0] = True  # min_tokens_to_keep = 1
    return top_idx, keep, cum[:, -1] >= p.squeeze(1)


def _top_p_remove_sorted(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-p by a full sort, exactly as transformers: the removal mask [R, V]."""
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)  # [R, V] ascending
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [R, V]
    remove = cum_probs <= (1 - top_p.to(scores.dtype)).unsqueeze(1)  # [R, V]
    remove[:, -1] = False  # min_tokens_to_keep = 1
    return remove.scatter(1, sorted_idx, remove)  # back to vocab order


def apply_typical_p(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Locally typical filtering with per-row mass [R] (Meister et al., as in transformers)."""
    log_probs = torch.log_softmax(scores, dim=-1)  # [R, V]
    entropy = -(log_probs * scores.softmax(dim=-1)).nansum(-1, keepdim=True)  # [R, 1]
    shifted = torch.abs(-log_probs - entropy)  # [R, V]
    sorted_shifted, sorted_idx = torch.sort(shifted, descending=False)
    cum_probs = scores.gather(-1, sorted_idx).softmax(dim=-1).cumsum(dim=-1)  # [R, V]
    last = (cum_probs < mass.to(scores.dtype).unsqueeze(1)).sum(dim=1)  # [R]
    last.clamp_(max=scores.size(1) - 1)
    remove = sorted_shifted > sorted_shifted.gather(1, last.unsqueeze(1))  # [R, V]
    remove[:, 0] = False  # min_tokens_to_keep = 1
    remove = remove.scatter(1, sorted_idx, remove)
    return scores.masked_fill_(remove, FILTER_VALUE)
