"""Constrained decoding: a request's grammar (a JSON schema or a regex, as the proto's
NextTokenChooserParameters carries it) as an llguidance matcher over the model's tokenizer.

Before a constrained request's token is chosen, its matcher says which tokens may come next
and every other logit of its row becomes -inf (the row alone: the batch's other requests are
untouched); the chosen token then advances the matcher. When the grammar is complete (the
matcher accepts nothing but EOS) the request ends as if it had produced EOS.

llguidance (MIT, no dependencies) was picked over xgrammar and outlines-core for the reasons in
../shared/reference/capabilities.md: a real CFG for any JSON and for `$ref`/`anyOf` tool schemas,
compiles in milliseconds where outlines-core's regex index takes seconds, and tens of
microseconds per mask. The router validates every grammar before it is queued (with the same
library and limits), so what reaches the shard compiles; compiled grammars are cached by
content and each request takes a copy, since a matcher holds its request's state.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections import OrderedDict
from pathlib import Path

import llguidance
import numpy as np
import torch

from common.grammar import GrammarError, grammar_text, parser_limits
from shard.native import load_library

CACHED_GRAMMARS = 64
MASK_SOURCE = Path(__file__).with_name("grammar_mask.c")


@functools.cache
def _mask_kernel():
    """grammar_mask.c's mask_logits, or None where it cannot be built (then masked_fill); set
    up once per process, not once per masked row."""
    lib = load_library(MASK_SOURCE, fallback="grammar masks use masked_fill")
    if lib is None:
        return None
    lib.mask_logits.restype = None
    lib.mask_logits.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
    return lib.mask_logits


class GrammarState:
    """One request's matcher: masks its logits row and follows the tokens it takes."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)  # one bit per token

    def allowed(self) -> torch.Tensor:
        """[vocab] bool: the tokens the grammar allows next (EOS alone once it is complete)."""
        self._compute()
        return self._unpacked()

    def mask(self, row: torch.Tensor) -> None:
        """Sets the logits of every token the grammar forbids to -inf, in place; row [vocab]
        (float32, as the logits are)."""
        self._compute()
        # The kernel writes through a host pointer: a GPU row takes the reference.
        usable = row.is_cpu and row.is_contiguous() and row.dtype == torch.float32
        kernel = _mask_kernel() if usable else None
        if kernel is None:
            self.mask_reference(row)
            return
        kernel(row.data_ptr(), self._bits.ctypes.data, self.vocab_size)

    def mask_reference(self, row: torch.Tensor) -> None:
        """What mask does, in PyTorch, from the last computed bitmask."""
        row.masked_fill_(~self._unpacked().to(row.device), float("-inf"))

    def _compute(self) -> None:
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)

    def _unpacked(self) -> torch.Tensor:
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab_size]
        return torch.from_numpy(bits).bool()

    def accept(self, token_id: int) -> bool:
        """Advances past the chosen token; True once the grammar is complete or cannot go on
        (the request then ends: a dead end must not run on to max_new_tokens)."""
        self.matcher.consume_token(token_id)
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class GrammarCompiler:
    """Builds GrammarStates over one tokenizer, compiling each distinct grammar once."""

    def __init__(self, tokenizer_file: Path, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.tokenizer_file = tokenizer_file
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[tuple[int, str], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use (~0.3 s for a 49k vocabulary), then kept."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(
                    str(self.tokenizer_file),
                    n_vocab=self.vocab_size,
                    eos_token=list(self.eos_token_ids),
                )
            return self._tokenizer

    def state(self, kind: int, value: str) -> GrammarState:
        """A fresh GrammarState for a grammar; raises GrammarError if it does not compile."""
        key = (kind, value)
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
        if compiled is None:
            compiled = self._compile(kind, value)
            with self._lock:
                self._compiled[key] = compiled
                if len(self._compiled) > CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
        return GrammarState(compiled.deep_copy(), self.vocab_size)

    def _compile(self, kind: int, value: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(
            self.tokenizer(), grammar_text(kind, value), log_level=0, limits=parser_limits()
        )
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return matcher
