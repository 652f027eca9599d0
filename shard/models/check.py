"""Whether a checkpoint can be served, decided from its config alone (no weights read), so the
launcher refuses it in one line before any shard starts."""

from __future__ import annotations

from pathlib import Path

from shard.models import NATIVE, architecture_of


def check_servable(model_dir: Path) -> str:
    """The implementation that will serve `model_dir` ("native" or "transformers"), or
    UnsupportedModel saying why none can."""
    architecture = architecture_of(model_dir)
    if architecture in NATIVE:
        return "native"
    from shard.models.transformers_backend import causal_lm_class

    causal_lm_class(Path(model_dir), architecture)
    return "transformers"
