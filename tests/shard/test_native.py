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


# --- kernels built at install (shard/native_build.py), loaded with checks (shard/native.py) ---


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Every kernel in every variant, as setup.py builds them (its own where they are current)."""
    from shard.native_build import build_all, up_to_date

    if up_to_date(native.INSTALLED):
        return native.INSTALLED
    return build_all(tmp_path_factory.mktemp("kernels"))


def test_the_best_installed_variant_for_this_cpu_is_chosen(installed) -> None:
    from common.cpu import cpu_flags
    from shard.native_build import variants

    path, variant = native.installed_library(SOURCE, installed)
    best = next(v for v in variants() if v.needs <= cpu_flags())
    assert variant == best.name and path == installed / f"fused-{best.name}.so"
    import ctypes

    ctypes.CDLL(str(path))  # loads and runs on this CPU


def test_libraries_others_could_have_written_are_refused(installed, tmp_path) -> None:
    import shutil

    copy = tmp_path / "kernels"
    shutil.copytree(installed, copy)
    path, variant = native.installed_library(SOURCE, copy)
    path.chmod(0o775)  # group-writable: anyone in the group could have replaced it
    refused, reason = native.installed_library(SOURCE, copy)
    assert refused is None and "writable by its group or others" in reason
    path.chmod(0o755)
    copy.chmod(0o777)  # so could anyone who can write the directory
    refused, reason = native.installed_library(SOURCE, copy)
    assert refused is None and "writable" in reason
    copy.chmod(0o755)
    assert native.installed_library(SOURCE, copy)[0] == path


def test_kernels_built_from_other_sources_are_not_loaded(installed, tmp_path) -> None:
    import json
    import shutil

    copy = tmp_path / "kernels"
    shutil.copytree(installed, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "sources": "0" * 16}))
    path, reason = native.installed_library(SOURCE, copy)
    assert path is None and "other sources" in reason
    (copy / "manifest.json").unlink()
    path, reason = native.installed_library(SOURCE, copy)
    assert path is None and "no kernels were built at install" in reason


def test_without_installed_kernels_they_are_compiled_and_it_is_said(
    tmp_path, monkeypatch, caplog
) -> None:
    """An error in the log and the status /info reports, never a silent change of path."""
    monkeypatch.setattr(native, "INSTALLED", tmp_path / "none")
    monkeypatch.setattr(native, "private_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(native, "_status", {})
    with caplog.at_level("ERROR"):
        assert native.library_path(SOURCE).parent == tmp_path
    assert "no kernels were built at install" in caplog.text
    assert native.kernel_status().startswith("compiled at start-up (no kernels were built")
