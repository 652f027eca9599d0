"""The commands the launcher runs, built from a `LauncherConfig`: `shard prepare`, one
`shard serve` per rank, and the router; `launch_plan` bundles them for `processes.launch`.
"""

from __future__ import annotations

import sys

from launcher.config import LauncherConfig
from launcher.processes import Command, LaunchPlan


def prepare_command(config: LauncherConfig) -> Command:
    """`shard prepare`: resolve/convert the model once, before any shard starts."""
    argv = [sys.executable, "-m", "shard", "prepare"]
    model = config.weights_cache_override or config.model_id  # TGI: the weights' directory
    argv += _optional("--model-id", model) + _optional("--revision", config.revision)
    argv += _optional("--cache-dir", config.cache_dir)
    argv += ["--json-output"] if config.json_output else []
    return Command("download", tuple(argv), hub_env(config))


def hub_env(config: LauncherConfig) -> dict[str, str]:
    """--huggingface-hub-cache, under the name TGI passes and the one huggingface_hub reads."""
    cache = config.huggingface_hub_cache
    return {} if cache is None else {"HUGGINGFACE_HUB_CACHE": cache, "HF_HUB_CACHE": cache}


def tracing_args(config: LauncherConfig) -> list[str]:
    return _optional("--otlp-endpoint", config.otlp_endpoint) + [
        "--otlp-service-name",
        config.otlp_service_name,
    ]


def shard_command(config: LauncherConfig, model_dir: str, rank: int) -> Command:
    """`shard serve` for one rank; torch.distributed finds its peers through the env."""
    argv = [
        sys.executable,
        "-m",
        "shard",
        "serve",
        "--model-id",
        model_dir,
        "--uds-path",
        config.shard_uds_path,
        "--rank",
        str(rank),
        "--world-size",
        str(config.num_shard),
        *_optional("--dtype", config.dtype),
        *_optional("--quantize", config.quantize),
        "--prefix-caching" if config.prefix_caching else "--no-prefix-caching",
        "--attention",
        config.attention,
        *_optional("--block-size", config.block_size),
        *_optional("--kv-cache-memory", config.kv_cache_memory),
        *_optional("--kv-cache-dtype", config.kv_cache_dtype),
        *_optional("--cuda-graphs", config.cuda_graphs),
        *_optional(
            "--batch-invariant",
            None if config.batch_invariant is None else str(config.batch_invariant).lower(),
        ),
        "--model-impl",
        config.model_impl,
        *_optional(
            "--cuda-memory-fraction",
            None if config.cuda_memory_fraction == 1.0 else config.cuda_memory_fraction,
        ),
        "--exit-with-parent",
        *(["--json-output"] if config.json_output else []),
        "--log-level",
        config.log_level,
        *_optional("--rope-scaling", config.rope_scaling),
        *_optional("--rope-factor", config.rope_factor),
        *_optional("--watermark-gamma", config.watermark_gamma),
        *_optional("--watermark-delta", config.watermark_delta),
        *tracing_args(config),
    ]
    env = {
        "RANK": str(rank),
        "WORLD_SIZE": str(config.num_shard),
        "MASTER_ADDR": config.master_addr,
        "MASTER_PORT": str(config.master_port),
        "LOG_LEVEL": config.log_level,
        **hub_env(config),
        # As TGI, in the environment: every kernel build in the shard reads it (shard/native.py).
        **({"DISABLE_CUSTOM_KERNELS": "true"} if config.disable_custom_kernels else {}),
    }
    return Command(f"shard {rank}", tuple(argv), env)


def shard_commands(config: LauncherConfig, model_dir: str) -> list[Command]:
    return [shard_command(config, model_dir, rank) for rank in range(config.num_shard)]


def router_command(config: LauncherConfig, model_dir: str) -> Command:
    """`python -m router` with every limit; optional flags only when set, so the router's
    own defaults (and warmup) decide the rest."""
    c = config
    argv = [
        sys.executable,
        "-m",
        "router",
        "--model-id",
        c.model_name,
        "--tokenizer-name",
        model_dir,
        "--master-shard-uds-path",
        c.shard_socket(0),
        "--hostname",
        c.hostname,
        "--port",
        str(c.port),
        "--max-concurrent-requests",
        str(c.max_concurrent_requests),
        "--max-best-of",
        str(c.max_best_of),
        "--max-stop-sequences",
        str(c.max_stop_sequences),
        "--max-top-n-tokens",
        str(c.max_top_n_tokens),
        "--max-batch-prefill-tokens",
        str(c.max_batch_prefill_tokens),
        "--waiting-served-ratio",
        str(c.waiting_served_ratio),
        "--max-waiting-tokens",
        str(c.max_waiting_tokens),
        "--validation-workers",
        str(c.validation_workers),
        "--max-client-batch-size",
        str(c.max_client_batch_size),
        "--payload-limit",
        str(c.payload_limit),
        "--graceful-shutdown-timeout",
        str(c.graceful_termination_timeout),
        "--prometheus-port",
        str(c.prometheus_port),
        *tracing_args(c),
    ]
    argv += _optional("--tokenizer-config-path", c.tokenizer_config_path)
    argv += _optional("--max-input-tokens", c.max_input_tokens)
    argv += _optional("--max-total-tokens", c.max_total_tokens)
    argv += _optional("--max-batch-total-tokens", c.max_batch_total_tokens)
    argv += _optional("--max-batch-size", c.max_batch_size)
    for origin in c.cors_allow_origin:
        argv += ["--cors-allow-origin", origin]
    argv += ["--json-output"] if c.json_output else []
    argv += ["--enable-prefill-logprobs"] if c.enable_prefill_logprobs else []
    argv += ["--disable-grammar-support"] if c.disable_grammar_support else []
    env = {"LOG_LEVEL": c.log_level, "COMPUTE_TYPE": c.compute_type, **hub_env(c)}
    if c.api_key is not None:  # in the environment: a command line is visible to every user
        env["API_KEY"] = c.api_key
    return Command("webserver", tuple(argv), env)


def _optional(flag: str, value: object) -> list[str]:
    return [] if value is None else [flag, str(value)]


def launch_plan(config: LauncherConfig) -> LaunchPlan:
    return LaunchPlan(
        prepare=prepare_command(config),
        shards=lambda model_dir: shard_commands(config, model_dir),
        router=lambda model_dir: router_command(config, model_dir),
        shard_sockets=[config.shard_socket(rank) for rank in range(config.num_shard)],
    )
