"""Reading checkpoints: safetensors (weights.py), GGUF files converted once (convert.py), and
where a --model-id lives on disk (model_files.py)."""
