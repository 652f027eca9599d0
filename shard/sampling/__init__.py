"""Choosing each request's next token: logits processors (penalties, temperature, top-k/p,
typical), the seeded draw, grammars, the watermark, and the guard that repairs a row whose
parameters overflow."""
