"""Green-list watermarking (Kirchenbauer et al. 2023, "A Watermark for Large Language
Models"), as TGI's WatermarkLogitsProcessor (`utils/watermark.py`) does it.

For each row, the previous token seeds a generator with `hash_key * previous_token`; a random
permutation of the vocabulary is drawn, its first `int(gamma * vocab)` ids are the green list,
and `delta` is added to their logits. A text is then detected by counting how many of its
tokens are green with respect to their predecessor (`Watermark.detect`, a z-score).

The green list depends only on (previous token, vocabulary size, gamma, hash_key): the
permutation is always drawn on the CPU with a fresh `torch.Generator`, so it is the same in
any process, batch position or batch composition, and on any device the logits live on.
(TGI seeds a generator on the logits' device, so its GPU lists differ from its CPU ones, and
its batched chooser reads the previous token from a padded id tensor, so rows shorter than the
longest take padding as their previous token; we use each row's real last token.)

gamma and delta are constructor values (TGI reads WATERMARK_GAMMA / WATERMARK_DELTA from the
environment; nothing is read here).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

HASH_KEY = 15485863  # TGI's: a large prime, so hash_key * token makes a wide seed
DEFAULT_GAMMA = 0.5
DEFAULT_DELTA = 2.0
DEFAULT_CACHE_SIZE = 256  # green masks kept: vocab bytes each (~150 kB for a 150k vocab)


class Watermark:
    """The watermark processor and detector for one (gamma, delta, hash_key) setting."""

    def __init__(
        self,
        gamma: float = DEFAULT_GAMMA,
        delta: float = DEFAULT_DELTA,
        hash_key: int = HASH_KEY,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"watermark gamma must be in (0, 1), got {gamma}")
        self.gamma = gamma
        self.delta = delta
        self.hash_key = hash_key
        # A permutation costs ~1 ms for a 150k vocabulary; frequent previous tokens
        # (spaces, punctuation, "the") come back all the time.
        self._mask = functools.lru_cache(maxsize=cache_size)(self._compute_mask)

    def green_ids(self, prev_token: int, vocab_size: int) -> torch.Tensor:
        """The green list after `prev_token`: int64 ids [int(gamma * vocab_size)]."""
        gen = torch.Generator().manual_seed(self.hash_key * prev_token)
        perm = torch.randperm(vocab_size, generator=gen)  # [V]
        return perm[: int(vocab_size * self.gamma)]

    def green_mask(self, prev_token: int, vocab_size: int) -> torch.Tensor:
        """The green list after `prev_token` as a CPU bool mask [V] (cached; do not modify)."""
        return self._mask(int(prev_token), int(vocab_size))

    def _compute_mask(self, prev_token: int, vocab_size: int) -> torch.Tensor:
        mask = torch.zeros(vocab_size, dtype=torch.bool)  # [V]
        mask[self.green_ids(prev_token, vocab_size)] = True
        return mask

    def green_masks(self, prev_tokens: Sequence[int], vocab_size: int) -> torch.Tensor:
        """One green mask per row: bool [R, V] on the CPU."""
        return torch.stack([self.green_mask(t, vocab_size) for t in prev_tokens])

    def apply(self, scores: torch.Tensor, prev_tokens: Sequence[int]) -> torch.Tensor:
        """Add delta to the green logits of every row, in place. scores [R, V], prev_tokens [R].

        -inf logits stay -inf (as TGI's `scores[mask] += delta`).
        """
        masks = self.green_masks(prev_tokens, scores.size(1)).to(scores.device)  # [R, V]
        return scores.add_(masks.to(scores.dtype), alpha=self.delta)

    def count_green(self, token_ids: Sequence[int], vocab_size: int) -> int:
        """How many of token_ids[1:] are green with respect to the token before them."""
        pairs = zip(token_ids[:-1], token_ids[1:], strict=True)
        return sum(bool(self.green_mask(prev, vocab_size)[tok]) for prev, tok in pairs)

    def detect(self, token_ids: Sequence[int], vocab_size: int) -> float:
        """The z-score of the green tokens in token_ids[1:] (the paper's one-proportion test).

        Pass the last prompt token first to score every generated token. Without a
        watermark z is ~N(0, 1); with one it grows like sqrt(len(token_ids)).
        """
        scored = len(token_ids) - 1
        if scored < 1:
            return 0.0
        green = self.count_green(token_ids, vocab_size)
        expected = self.gamma * scored
        return (green - expected) / math.sqrt(scored * self.gamma * (1 - self.gamma))


DEFAULT_WATERMARK = Watermark()  # TGI's defaults; pure constants, no environment read
