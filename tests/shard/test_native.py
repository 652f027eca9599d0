"""launcher --disable-custom-kernels (DISABLE_CUSTOM_KERNELS, as TGI passes it to the shards):
no C kernel is built, so every caller falls back to its PyTorch reference."""

from __future__ import annotations

import pytest

from shard import native
from shard.layers.fused import SOURCE


@pytest.mark.parametrize("value", ["true", "1", "True"])
def test_disabled_custom_kernels_are_never_built(tmp_path, monkeypatch, value) -> None:
    monkeypatch.setenv("DISABLE_CUSTOM_KERNELS", value)
    with pytest.raises(RuntimeError, match="DISABLE_CUSTOM_KERNELS"):
        native.build_library(tmp_path, SOURCE)
    assert not list(tmp_path.iterdir())


def test_kernels_build_when_not_disabled(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DISABLE_CUSTOM_KERNELS", "false")
    assert native.build_library(tmp_path, SOURCE).exists()
