"""Finds the local Hugging Face directory for `--model-id`: a directory, a `.gguf` file
(converted once), a Hub repo id from the local cache, or nothing (the embedded default model)."""

from __future__ import annotations

from pathlib import Path

from shard.checkpoint.convert import default_cache_dir, default_gguf_path, ensure_converted

ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def resolve_model_dir(
    model_id: str | None, revision: str | None = None, cache_dir: Path | None = None
) -> Path:
    cache_dir = cache_dir or default_cache_dir()
    if not model_id:
        return ensure_converted(default_gguf_path(), cache_dir)
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return ensure_converted(path, cache_dir)
    if path.exists() or model_id.startswith((".", "/")) or model_id.count("/") > 1:
        raise FileNotFoundError(f"model {model_id!r} is neither a directory nor a .gguf file")
    return hub_snapshot(model_id, revision)


def hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The repo from the local Hugging Face cache (downloading where a network exists;
    HF_HUB_OFFLINE=1 is honoured by huggingface_hub)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except Exception as err:  # noqa: BLE001 - many hub errors, one message
        raise FileNotFoundError(
            f"model {repo_id!r} is not a local directory or .gguf file and could not be "
            f"resolved from the Hugging Face cache: {err}"
        ) from err
