"""The launcher's settings: TGI's launcher flags -> one resolved, validated `LauncherConfig`.

`resolve_config` is the one place where the raw flags become a config (TGI's derived defaults,
the legacy `max_input_length` alias, and every check); errors are `ConfigError`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from common.logs import LOG_LEVELS, python_level
from launcher.environment import compute_type, nvidia_smi_count
from launcher.flags import FLAGS, Support

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what `shard` serves without a model
DTYPES = ("float32", "bfloat16", "float16")
# --quantize values served on the CPU (shard/quant/loaders.py says what each one is).
QUANTIZE = ("none", "int8", "eetq", "int4", "gguf", "gptq", "awq")
ATTENTIONS = ("auto", "sdpa", "torch", "flash", "triton")
# TGI's ATTENTION values name its CUDA kernels; here the shard picks its paged kernel itself.
TGI_ATTENTIONS = ("paged", "flashdecoding", "flashinfer", "flashdecoding-ipex")
_MEMORY = re.compile(r"(\d+(\.\d*)?|\.\d+)\s*(b|kb|mb|gb|kib|mib|gib)?", re.IGNORECASE)


log = logging.getLogger("launcher")


class ConfigError(ValueError):
    """An invalid flag or combination; the launcher logs it and exits 1."""


@dataclass(frozen=True)
class LauncherConfig:
    """Every launcher setting, resolved (defaults filled in) and validated once."""

    model_id: str | None = None  # None: the shards' embedded default model
    revision: str | None = None
    validation_workers: int = 2
    num_shard: int = 1
    dtype: str | None = None  # None: the shards decide (shard/placement.py)
    quantize: str | None = None  # None: the checkpoint's own (GGUF blocks, GPTQ/AWQ), else dense
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int | None = None  # None: decided at warmup
    max_total_tokens: int | None = None
    waiting_served_ratio: float = 0.3
    max_batch_prefill_tokens: int = 4096
    max_batch_total_tokens: int | None = None
    max_waiting_tokens: int = 20
    max_batch_size: int | None = None
    hostname: str = "0.0.0.0"
    port: int = 3000
    shard_uds_path: str = "/tmp/text-generation-server"
    master_addr: str = "localhost"
    master_port: int = 29500
    json_output: bool = False
    cors_allow_origin: tuple[str, ...] = ()
    api_key: str | None = None
    max_client_batch_size: int = 4
    payload_limit: int = 2_000_000
    enable_prefill_logprobs: bool = False
    disable_grammar_support: bool = False
    graceful_termination_timeout: float = 90.0
    disable_custom_kernels: bool = False  # the shards run the PyTorch reference code
    prometheus_port: int = 9000
    huggingface_hub_cache: str | None = None
    weights_cache_override: str | None = None  # a directory the model is read from instead
    rope_scaling: str | None = None  # linear or dynamic, overriding the model's
    rope_factor: float | None = None
    otlp_endpoint: str | None = None
    otlp_service_name: str = "text-generation-inference.router"
    watermark_gamma: float | None = None  # None: the shards' default (TGI's 0.5)
    watermark_delta: float | None = None  # None: 2.0
    tokenizer_config_path: str | None = None
    compute_type: str = "1-cpu"  # x-compute-type: COMPUTE_TYPE, else {num_shard}-{device}
    kv_cache_memory: str | None = None  # bytes ("2GiB") or a fraction; None: the shards'
    kv_cache_dtype: str | None = None  # float32, bfloat16 or float16; None: the model's dtype
    attention: str = "auto"
    block_size: int | None = None  # None: the attention backend's
    cuda_memory_fraction: float = 1.0
    cuda_graphs: str | None = None  # None: the shards' default (TGI's 1,2,4,8,16,32)
    cache_dir: str | None = None  # where converted models live
    batch_invariant: bool | None = None  # None: the shards' default (CPU on, GPU off)
    model_impl: str = "auto"  # auto, native or transformers (shard/models/__init__.py)
    log_level: str = "info"
    prefix_caching: bool = True  # env PREFIX_CACHING, as TGI (no flag)

    def __post_init__(self) -> None:
        for ok, message in self._checks():
            if not ok:
                raise ConfigError(message)

    def _checks(self) -> list[tuple[bool, str]]:
        """TGI's launcher checks, in its words, plus ours; the first failing one is reported."""
        inp, total, batch_total = (
            self.max_input_tokens,
            self.max_total_tokens,
            self.max_batch_total_tokens,
        )
        return [
            (self.num_shard >= 1, "`num_shard` cannot be < 1"),
            (self.validation_workers > 0, "`validation_workers` must be > 0"),
            (self.max_concurrent_requests > 0, "`max_concurrent_requests` must be > 0"),
            (
                self.max_batch_size is None or self.max_batch_size > 0,
                "`max_batch_size` must be > 0",
            ),
            (self.max_batch_prefill_tokens > 0, "`max_batch_prefill_tokens` must be > 0"),
            (
                inp is None or total is None or inp < total,
                f"`max_input_tokens`({inp}) must be < `max_total_tokens`({total})",
            ),
            (
                total is None or batch_total is None or total <= batch_total,
                (
                    f"`max_total_tokens` must be <= `max_batch_total_tokens`. "
                    f"Given: {total} and {batch_total}"
                ),
            ),
            (
                batch_total is None or self.max_batch_prefill_tokens <= batch_total,
                (
                    "`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`. "
                    f"Given: {self.max_batch_prefill_tokens} and {batch_total}"
                ),
            ),
            (0 <= self.port <= 65535, f"`port` must be in 0..65535, not {self.port}"),
            (
                0 <= self.prometheus_port <= 65535,
                f"`prometheus_port` must be in 0..65535, not {self.prometheus_port}",
            ),
            (
                self.rope_factor is None or self.rope_factor > 0,
                f"`rope_factor` must be > 0, not {self.rope_factor}",
            ),
            (self.graceful_termination_timeout >= 0, "`graceful_termination_timeout` must be >= 0"),
            (
                self.dtype is None or self.dtype in DTYPES,
                f"`dtype` must be one of {', '.join(DTYPES)}, not {self.dtype!r}",
            ),
            (
                0 < self.cuda_memory_fraction <= 1,
                f"`cuda_memory_fraction` must be in (0, 1], not {self.cuda_memory_fraction}",
            ),
            (
                self.quantize is None or self.quantize in QUANTIZE,
                f"`quantize` must be one of {', '.join(QUANTIZE)} on the CPU, not "
                f"{self.quantize!r}",
            ),
            (
                self.attention in ATTENTIONS,
                f"`attention` must be one of {', '.join(ATTENTIONS)}, not {self.attention!r}",
            ),
            (self.block_size is None or self.block_size > 0, "`block_size` must be > 0"),
            (
                self.cuda_graphs is None or is_cuda_graphs(self.cuda_graphs),
                f"`cuda_graphs` must be batch sizes like 1,2,4,8 (or 0), not {self.cuda_graphs!r}",
            ),
            (
                self.kv_cache_memory is None or is_memory_budget(self.kv_cache_memory),
                f"invalid `kv_cache_memory` {self.kv_cache_memory!r} (e.g. 0.3, 4GiB, 500MB)",
            ),
            (self.log_level in LOG_LEVELS.values(), f"invalid LOG_LEVEL {self.log_level!r}"),
        ]

    @property
    def model_name(self) -> str:
        """The model as the user named it; the router reports it in /info."""
        return self.model_id or DEFAULT_MODEL_NAME

    def shard_socket(self, rank: int) -> str:
        return f"{self.shard_uds_path}-{rank}"


def is_memory_budget(text: str) -> bool:
    """The shard's MemoryBudget grammar ("0.3", "2GiB", "500MB", "1000000"), checked here
    without importing torch so that a typo fails before any model is loaded."""
    match = _MEMORY.fullmatch(text.strip())
    return match is not None and float(match.group(1)) > 0


def is_cuda_graphs(text: str) -> bool:
    """TGI's --cuda-graphs grammar: comma-separated batch sizes >= 0."""
    return re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", text) is not None


def parse_bool(name: str, text: str | None) -> bool | None:
    """TGI's `--sharded true|false` takes a value, so it cannot be a typer flag."""
    if text is None:
        return None
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ConfigError(f"`{name}` must be true or false, not {text!r}")


def count_visible_devices(
    environ: Mapping[str, str], count_gpus: Callable[[], int | None] | None = None
) -> int | None:
    """TGI's count: the entries of CUDA_VISIBLE_DEVICES, else of NVIDIA_VISIBLE_DEVICES (whose
    `all` and `void`, set by NVIDIA's container images, mean every GPU nvidia-smi lists), else
    of ZE_AFFINITY_MASK; None when none is set."""
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "ZE_AFFINITY_MASK"):
        value = environ.get(name, "").strip()
        if not value:
            continue
        if name == "NVIDIA_VISIBLE_DEVICES" and value in ("all", "void"):
            return (count_gpus or nvidia_smi_count)()
        return len([d for d in value.split(",") if d.strip()]) or None
    return None


def resolve_num_shard(
    sharded: bool | None, num_shard: int | None, environ: Mapping[str, str]
) -> int:
    """TGI's find_num_shards, except that `--sharded false` with several shards is an error."""
    resolved = num_shard or count_visible_devices(environ) or nvidia_smi_count() or 1
    if num_shard is not None and num_shard < 1:
        raise ConfigError("`num_shard` cannot be < 1")
    if sharded is True and resolved <= 1:
        raise ConfigError(
            f"`sharded` is true but `num_shard` is {resolved}: set --num-shard "
            "(or CUDA_VISIBLE_DEVICES) to 2 or more"
        )
    if sharded is False and resolved > 1:
        raise ConfigError(f"`sharded` is false but `num_shard` is {resolved}")
    return resolved


def resolve_max_input_tokens(
    max_input_tokens: int | None, max_input_length: int | None
) -> int | None:
    if max_input_tokens is not None and max_input_length is not None:
        raise ConfigError(
            "Both `max_input_tokens` and `max_input_length` are set. Please define "
            "only `max_input_tokens` as `max_input_length` is deprecated for naming "
            "consistency."
        )
    return max_input_tokens if max_input_tokens is not None else max_input_length


def resolve_log_level(environ: Mapping[str, str]) -> str:
    """TGI's LOG_LEVEL filter -> the Python level every process logs at."""
    try:
        return python_level(environ.get("LOG_LEVEL", "info"))
    except ValueError as err:
        raise ConfigError(f"{err}: levels are {', '.join(LOG_LEVELS)}") from err


def resolve_attention(value: str) -> str:
    if value in TGI_ATTENTIONS:
        log.info("ATTENTION=%s names one of TGI's CUDA kernels: using auto", value)
        return "auto"
    return value


FP8_KV_NOTE = "the cache keeps the model's dtype"


def resolve_kv_cache_dtype(value: str | None) -> str | None:
    """TGI's fp8 cache dtypes are CUDA kernels of its own: logged, and the cache keeps the
    model's dtype; auto is None."""
    if value is not None and value.startswith("fp8"):
        log.warning(
            "`--kv-cache-dtype %s` is not built here: the cache keeps the model's dtype", value
        )
        return None
    return None if value in (None, "auto") else value


def set_aside_tgi_only(flags: dict[str, Any]) -> None:
    """Removes the NOT_APPLICABLE and REFUSED flags from `flags`: logs the first kind where set,
    raises ConfigError for the second."""
    for flag in FLAGS:
        if flag.support not in (Support.NOT_APPLICABLE, Support.REFUSED):
            continue
        value = flags.pop(flag.dest)
        if not flag.is_set(value):
            continue
        if flag.support is Support.REFUSED:
            raise ConfigError(f"`--{flag.name}` is refused: {flag.here}")
        log.warning("`--%s %s` is not applicable here: %s", flag.name, value, flag.here)


def resolve_config(flags: Mapping[str, Any], environ: Mapping[str, str]) -> LauncherConfig:
    """The one place where the raw flags become a LauncherConfig: TGI's derived defaults,
    the legacy alias, and every check. Raises ConfigError."""
    flags = dict(flags)
    flags.pop("env", None)  # printed by the CLI
    set_aside_tgi_only(flags)
    sharded = parse_bool("sharded", flags.pop("sharded"))
    num_shard = resolve_num_shard(sharded, flags.pop("num_shard"), environ)
    max_input_tokens = resolve_max_input_tokens(
        flags.pop("max_input_tokens"), flags.pop("max_input_length")
    )
    prefill = flags.pop("max_batch_prefill_tokens")
    return LauncherConfig(
        **{
            **flags,
            "quantize": flags["quantize"].lower() if flags["quantize"] else None,
            "cors_allow_origin": tuple(flags["cors_allow_origin"] or ()),
            "attention": resolve_attention(flags["attention"]),
            "kv_cache_dtype": resolve_kv_cache_dtype(flags["kv_cache_dtype"]),
            "batch_invariant": parse_bool("batch-invariant", flags["batch_invariant"]),
        },
        num_shard=num_shard,
        max_input_tokens=max_input_tokens,
        max_batch_prefill_tokens=4096 if prefill is None else prefill,
        log_level=resolve_log_level(environ),
        compute_type=compute_type(num_shard, environ),
        prefix_caching=parse_bool("PREFIX_CACHING", environ.get("PREFIX_CACHING")) is not False,
    )
