"""The engine: a batch of requests (batch.py), one step of the model over the paged KV cache
(model_runner.py, kv_cache.py, forward_context.py, cuda_graphs.py), the generator that turns
steps into tokens (generator.py) and the warmup that sizes the cache (warmup.py)."""
