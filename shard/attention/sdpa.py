"""Paged attention through `torch.nn.functional.scaled_dot_product_attention`: the fast CPU path
where batch invariance is off. Decode-only steps on the CPU take the paged kernel instead
(paged_decode.py), and so does every step in batch-invariant mode (shard/numerics.py): SDPA
computes a prompt token in another order than a decode token at the same position, and its
blocking changes with the shapes of the step.

Sequences go through batched SDPA calls on padded [B, H, Qmax, D] queries and [B, KV, Lmax, D]
gathered K/V. Padding costs B * Qmax * Lmax, so a mixed step (say 15 decodes next to a
256-token prompt chunk, which the generator schedules all the time) would pad every decode to
256 query rows: 17x slower than two calls. `prepare` therefore splits a step into groups of
sequences whose padded cost stays within WASTE x their real cost (+ SLACK pairs, so tiny
prompts are not split apart): a decode-only step or a single prompt is one group and one
call; a mixed step is typically one call for its decodes and one for its prompt chunks.

Per group, `prepare` builds once per step what every layer shares:
  slot_index  [G * Lmax]          cache slot of key position l of the group's sequence g (slot =
                                  block * block_size + offset); positions past seq_len point at
                                  some cached slot (often reserved block 0) and are masked out
  mask        [G, 1, Qmax, Lmax]  True = attend: key <= query position and key < seq_len,
                                  causal aligned at the end (query i of a sequence is at
                                  seq_len - query_len + i); None when not needed: equal-length
                                  decodes, and equal-length whole prompts (SDPA's own is_causal,
                                  top-left = bottom-right there)
  tokens      [Tg]                the group's rows of the step's q [T, H, D] (None: all of them)
  rows        [Tg]                padded row g * Qmax + j of each of those tokens (None when all
                                  query_lens are equal, e.g. decodes: q is then only reshaped)
Each layer then gathers its K/V (two index_selects into a per-step workspace), pads q, calls
SDPA and unpads.

Measured on CPU (torch 2.13, 1 thread; decode B=16, L~300, 9 q / 3 kv heads, head_dim 64):
index_select gathers 1.6-3x faster than advanced indexing; SDPA takes the gathered K/V as a
strided [B, KV, L, D] view (making it contiguous first doubles the time); enable_gqa beats
expanding K/V to every query head (~2x bf16, ~3x fp32); bool and additive float masks cost the
same; folding the query heads of a kv group into query rows (decode) gained nothing measurable;
gathering into a per-step workspace instead of fresh per-layer tensors avoids mmap page faults
that sometimes doubled fp32 decode time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from shard.attention.paged_decode import paged_decode_kernel
from shard.attention.torch_ref import TorchReferenceAttention
from shard.engine.forward_context import AttentionMetadata
from shard.engine.kv_cache import LayerKV
from shard.numerics import batch_invariant

WASTE = 2.0  # a group's padded query x key pairs may be this many times its real ones ...
SLACK = 4096  # ... plus this many (a call's fixed overhead is worth a few thousand pairs)


@dataclass
class SdpaGroup:
    """Sequences attended in one SDPA call."""

    num_seqs: int  # G
    max_query_len: int  # Qmax
    max_seq_len: int  # Lmax
    slot_index: torch.Tensor  # [G * Lmax] int64
    mask: torch.Tensor | None  # [G, 1, Qmax, Lmax] bool, or None (no masking / is_causal)
    is_causal: bool  # equal-length whole prompts: SDPA's own causal mask
    tokens: torch.Tensor | None  # [Tg] int64 rows of the step's q, or None for all of them
    rows: torch.Tensor | None  # [Tg] int64 rows of the padded [G * Qmax], or None: no padding


@dataclass
class SdpaStep:
    """What every layer of one step shares (meta.prepared["sdpa"])."""

    groups: list[SdpaGroup]
    # Gather buffers shared by every layer and group, keyed by the cache's dtype and shape:
    # (K, V), each [max(G * Lmax), KV, D]. One allocation per step instead of two per layer.
    workspace: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def workspace_rows(self) -> int:
        return max(g.num_seqs * g.max_seq_len for g in self.groups)


def plan_groups(query_lens: list[int], seq_lens: list[int]) -> list[list[int]]:
    """Sequence ids per SDPA call: greedy over sequences by decreasing (query_len, seq_len),
    a sequence joins the current group while its padded cost stays within WASTE x real + SLACK."""
    order = sorted(range(len(query_lens)), key=lambda i: (query_lens[i], seq_lens[i]), reverse=True)
    groups: list[list[int]] = []
    for i in order:
        candidate = groups[-1] + [i] if groups else [i]
        q_max = max(query_lens[j] for j in candidate)
        s_max = max(seq_lens[j] for j in candidate)
        real = sum(query_lens[j] * seq_lens[j] for j in candidate)
        if groups and len(candidate) * q_max * s_max <= WASTE * real + SLACK:
            groups[-1] = candidate
        else:
            groups.append([i])
    return [sorted(g) for g in groups]  # step order inside a group


def slot_index(block_tables: torch.Tensor, block_size: int, max_seq_len: int) -> torch.Tensor:
    """Cache slot of every key position of every sequence: [G * Lmax] int64."""
    pos = torch.arange(max_seq_len, device=block_tables.device)  # [Lmax]
    blocks = block_tables.long()[:, pos // block_size]  # [G, Lmax]
    return (blocks * block_size + pos % block_size).reshape(-1)


def causal_mask(
    query_lens: torch.Tensor, seq_lens: torch.Tensor, max_query_len: int, max_seq_len: int
) -> torch.Tensor:
    """True where padded query row j of sequence g may see key l: [G, 1, Qmax, Lmax] bool.
    query_lens, seq_lens: [G] int64."""
    rows = torch.arange(max_query_len, device=seq_lens.device)  # [Qmax]
    keys = torch.arange(max_seq_len, device=seq_lens.device)  # [Lmax]
    query_pos = (seq_lens - query_lens)[:, None] + rows[None, :]  # [G, Qmax]
    # Padding rows (j >= query_len) sit past seq_len and see keys < seq_len: never an empty row.
    visible = (keys[None, None, :] <= query_pos[:, :, None]) & (keys < seq_lens[:, None, None])
    return visible.unsqueeze(1)  # [G, 1, Qmax, Lmax]


def token_rows(
    starts: torch.Tensor, query_lens: torch.Tensor, total: int, max_query_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token j of group sequence g: its row of the step's q (starts[g] + j) and of the padded
    [G * Qmax] layout (g * Qmax + j). starts, query_lens: [G] int64; returns two [Tg] int64."""
    device = starts.device
    seq = torch.repeat_interleave(
        torch.arange(len(query_lens), device=device), query_lens, output_size=total
    )  # [Tg]: group sequence of each token
    first = query_lens.cumsum(0) - query_lens  # [G]: each sequence's first token in the group
    offset = torch.arange(total, device=device) - first[seq]  # [Tg]
    return starts[seq] + offset, seq * max_query_len + offset


def build_group(meta: AttentionMetadata, seq_ids: list[int]) -> SdpaGroup:
    device = meta.block_tables.device
    q_lens = [meta.query_lens_list[i] for i in seq_ids]
    s_lens = [meta.seq_lens_list[i] for i in seq_ids]
    q_max, s_max = max(q_lens), max(s_lens)
    uniform = min(q_lens) == q_max and min(s_lens) == s_max  # no padding anywhere
    is_causal = uniform and q_max == s_max > 1  # whole prompts: top-left causal is right
    whole_step = len(seq_ids) == meta.num_seqs
    ids = torch.tensor(seq_ids, dtype=torch.long, device=device)  # [G]
    q_lens_t = torch.tensor(q_lens, dtype=torch.long, device=device)  # [G]
    s_lens_t = torch.tensor(s_lens, dtype=torch.long, device=device)  # [G]
    tokens, rows = token_rows(meta.query_start_loc.long()[ids], q_lens_t, sum(q_lens), q_max)
    return SdpaGroup(
        num_seqs=len(seq_ids),
        max_query_len=q_max,
        max_seq_len=s_max,
        slot_index=slot_index(meta.block_tables[ids], meta.block_size, s_max),
        mask=None
        if uniform and (q_max == 1 or is_causal)
        else causal_mask(q_lens_t, s_lens_t, q_max, s_max),
        is_causal=is_causal,
        tokens=None if whole_step else tokens,
        rows=None if min(q_lens) == q_max else rows,
    )


def build_step(meta: AttentionMetadata) -> SdpaStep:
    plan = plan_groups(meta.query_lens_list, meta.seq_lens_list)
    return SdpaStep([build_group(meta, seq_ids) for seq_ids in plan])


def pad_queries(q: torch.Tensor, group: SdpaGroup) -> torch.Tensor:
    """The group's [Tg, H, D] -> [G, H, Qmax, D] (a view when no padding is needed)."""
    _, num_heads, head_dim = q.shape
    shape = (group.num_seqs, group.max_query_len, num_heads, head_dim)
    if group.rows is None:
        return q.reshape(shape).transpose(1, 2)
    padded = q.new_zeros(group.num_seqs * group.max_query_len, num_heads, head_dim)
    return padded.index_copy_(0, group.rows, q).view(shape).transpose(1, 2)


def unpad_output(out: torch.Tensor, group: SdpaGroup) -> torch.Tensor:
    """[G, H, Qmax, D] -> the group's [Tg, H, D]."""
    batch, num_heads, q_max, head_dim = out.shape
    flat = out.transpose(1, 2).reshape(batch * q_max, num_heads, head_dim)  # [G * Qmax, H, D]
    return flat if group.rows is None else flat.index_select(0, group.rows)


def gather_kv(
    cache: LayerKV, group: SdpaGroup, step: SdpaStep, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group sequence's first Lmax cached K and V, as [G, KV, Lmax, D] strided views of the
    step's workspace: valid until the next gather overwrites them."""
    _, _, num_kv_heads, head_dim = cache.key.shape
    key = (cache.key.dtype, cache.key.device, num_kv_heads, head_dim)
    if key not in step.workspace:
        rows = step.workspace_rows
        step.workspace[key] = (
            cache.key.new_empty(rows, num_kv_heads, head_dim),
            cache.value.new_empty(rows, num_kv_heads, head_dim),
        )
    used = group.num_seqs * group.max_seq_len
    k_buf, v_buf = (b[:used] for b in step.workspace[key])  # [G * Lmax, KV, D]
    torch.index_select(cache.key.view(-1, num_kv_heads, head_dim), 0, group.slot_index, out=k_buf)
    torch.index_select(cache.value.view(-1, num_kv_heads, head_dim), 0, group.slot_index, out=v_buf)
    shape = (group.num_seqs, group.max_seq_len, num_kv_heads, head_dim)
    k, v = (b.view(shape).transpose(1, 2) for b in (k_buf, v_buf))  # [G, KV, Lmax, D]
    return k.to(dtype), v.to(dtype)


def attend_group(
    q: torch.Tensor, cache: LayerKV, group: SdpaGroup, step: SdpaStep, scale: float
) -> torch.Tensor:
    """The step's q [T, H, D] -> the group's output [Tg, H, D]."""
    q = q if group.tokens is None else q.index_select(0, group.tokens)  # [Tg, H, D]
    k, v = gather_kv(cache, group, step, q.dtype)  # [G, KV, Lmax, D]
    out = F.scaled_dot_product_attention(
        pad_queries(q, group),
        k,
        v,  # [G, H, Qmax, D]
        attn_mask=group.mask,
        is_causal=group.is_causal,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )  # [G, H, Qmax, D]
    return unpad_output(out, group)


def _paged(meta: AttentionMetadata) -> bool:
    """Whether the step goes to the paged kernel (where it supports the tensors)."""
    return meta.is_decode_only or batch_invariant()


class SdpaPagedAttention:
    name = "sdpa"

    def prepare(self, meta: AttentionMetadata) -> None:
        if _paged(meta) and paged_decode_kernel() is not None:
            return  # the paged kernel needs nothing prepared (else forward prepares)
        meta.prepared["sdpa"] = build_step(meta)

    def forward(
        self,
        q: torch.Tensor,
        cache: LayerKV,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Layers with a window or soft-capping take the paged kernel for every step (SDPA
        has no soft-capping), else the torch reference."""
        special = window is not None or softcap is not None
        kernel = paged_decode_kernel() if special or _paged(meta) else None
        if kernel is not None and kernel.supports(q, cache, meta, any_step=special):
            return kernel.forward(q, cache, meta, scale, window, softcap)
        if special:
            return TorchReferenceAttention().forward(q, cache, meta, scale, window, softcap)
        step = meta.prepared.get("sdpa")
        if step is None:  # prepare was skipped: build it now, once, for every later layer
            self.prepare(meta)
            step = meta.prepared["sdpa"]
        if len(step.groups) == 1:
            return attend_group(q, cache, step.groups[0], step, scale)
        out = torch.empty_like(q)  # [T, H, D]
        for group in step.groups:
            out.index_copy_(0, group.tokens, attend_group(q, cache, group, step, scale))
        return out
