"""`python -m launcher`: TGI's launcher flags -> one validated `LauncherConfig` -> the commands
for `shard prepare`, the shards and the router -> `processes.launch`.

Every flag keeps TGI's name and default and also reads its upper-snake environment variable
(`--max-concurrent-requests` / `MAX_CONCURRENT_REQUESTS`), so TGI deployment files work as they
are. The environment is read when the command runs, never at import time.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from common.logs import setup_logging
from launcher.processes import Command, ExitCode, LaunchPlan, StopSignal, Timing, launch

log = logging.getLogger("launcher")

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what `shard` serves without a model
DTYPES = ("float32", "bfloat16", "float16")
ATTENTIONS = ("auto", "sdpa", "torch", "flash")
# TGI's LOG_LEVEL names -> Python's; "trace" has no Python level.
LOG_LEVELS = {
    "trace": "debug",
    "debug": "debug",
    "info": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
    "critical": "critical",
}
_MEMORY = re.compile(r"(\d+(\.\d*)?|\.\d+)\s*(b|kb|mb|gb|kib|mib|gib)?", re.IGNORECASE)


class ConfigError(ValueError):
    """An invalid flag or combination; the launcher logs it and exits 1."""


@dataclass(frozen=True)
class LauncherConfig:
    """Every launcher setting, resolved (defaults filled in) and validated once."""

    model_id: str | None = None  # None: the shards' embedded default model
    revision: str | None = None
    validation_workers: int = 2
    num_shard: int = 1
    dtype: str = "float32"
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
    graceful_termination_timeout: float = 90.0
    disable_custom_kernels: bool = False  # accepted for TGI compatibility; nothing to disable
    kv_cache_memory: str = "0.3"  # bytes ("2GiB") or a fraction of free memory
    attention: str = "auto"
    block_size: int = 16
    cache_dir: str | None = None  # where converted models live
    log_level: str = "info"

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
            (self.graceful_termination_timeout >= 0, "`graceful_termination_timeout` must be >= 0"),
            (
                self.dtype in DTYPES,
                f"`dtype` must be one of {', '.join(DTYPES)}, not {self.dtype!r}",
            ),
            (
                self.attention in ATTENTIONS,
                f"`attention` must be one of {', '.join(ATTENTIONS)}, not {self.attention!r}",
            ),
            (self.block_size > 0, "`block_size` must be > 0"),
            (
                is_memory_budget(self.kv_cache_memory),
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


def count_visible_devices(environ: Mapping[str, str]) -> int | None:
    """Entries in CUDA_VISIBLE_DEVICES, or None when unset or empty."""
    devices = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return len(devices) or None


def resolve_num_shard(
    sharded: bool | None, num_shard: int | None, environ: Mapping[str, str]
) -> int:
    """TGI's find_num_shards, except that `--sharded false` with several shards is an error."""
    resolved = num_shard or count_visible_devices(environ) or 1
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
    name = environ.get("LOG_LEVEL", "info").strip().lower()
    if name not in LOG_LEVELS:
        raise ConfigError(f"invalid LOG_LEVEL {name!r}: use one of {', '.join(LOG_LEVELS)}")
    return LOG_LEVELS[name]


def resolve_config(flags: Mapping[str, Any], environ: Mapping[str, str]) -> LauncherConfig:
    """The one place where the raw flags become a LauncherConfig: TGI's derived defaults,
    the legacy alias, and every check. Raises ConfigError."""
    flags = dict(flags)
    sharded = parse_bool("sharded", flags.pop("sharded"))
    num_shard = resolve_num_shard(sharded, flags.pop("num_shard"), environ)
    max_input_tokens = resolve_max_input_tokens(
        flags.pop("max_input_tokens"), flags.pop("max_input_length")
    )
    prefill = flags.pop("max_batch_prefill_tokens")
    return LauncherConfig(
        **{
            **flags,
            "dtype": flags["dtype"] or "float32",
            "cors_allow_origin": tuple(flags["cors_allow_origin"] or ()),
        },
        num_shard=num_shard,
        max_input_tokens=max_input_tokens,
        max_batch_prefill_tokens=4096 if prefill is None else prefill,
        log_level=resolve_log_level(environ),
    )


def prepare_command(config: LauncherConfig) -> Command:
    """`shard prepare`: resolve/convert the model once, before any shard starts."""
    argv = [sys.executable, "-m", "shard", "prepare"]
    argv += _optional("--model-id", config.model_id) + _optional("--revision", config.revision)
    argv += _optional("--cache-dir", config.cache_dir)
    argv += ["--json-output"] if config.json_output else []
    return Command("download", tuple(argv))


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
        "--dtype",
        config.dtype,
        "--attention",
        config.attention,
        "--block-size",
        str(config.block_size),
        "--kv-cache-memory",
        config.kv_cache_memory,
        "--exit-with-parent",
        *(["--json-output"] if config.json_output else []),
        "--log-level",
        config.log_level,
    ]
    env = {
        "RANK": str(rank),
        "WORLD_SIZE": str(config.num_shard),
        "MASTER_ADDR": config.master_addr,
        "MASTER_PORT": str(config.master_port),
        "LOG_LEVEL": config.log_level,
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
    ]
    argv += _optional("--max-input-tokens", c.max_input_tokens)
    argv += _optional("--max-total-tokens", c.max_total_tokens)
    argv += _optional("--max-batch-total-tokens", c.max_batch_total_tokens)
    argv += _optional("--max-batch-size", c.max_batch_size)
    argv += _optional("--api-key", c.api_key)
    for origin in c.cors_allow_origin:
        argv += ["--cors-allow-origin", origin]
    argv += ["--json-output"] if c.json_output else []
    argv += ["--enable-prefill-logprobs"] if c.enable_prefill_logprobs else []
    return Command("webserver", tuple(argv), {"LOG_LEVEL": c.log_level})


def _optional(flag: str, value: object) -> list[str]:
    return [] if value is None else [flag, str(value)]


def launch_plan(config: LauncherConfig) -> LaunchPlan:
    return LaunchPlan(
        prepare=prepare_command(config),
        shards=lambda model_dir: shard_commands(config, model_dir),
        router=lambda model_dir: router_command(config, model_dir),
        shard_sockets=[config.shard_socket(rank) for rank in range(config.num_shard)],
    )


def run(flags: Mapping[str, Any], environ: Mapping[str, str]) -> int:
    """Validates the flags, then launches and supervises; returns the exit code."""
    level = environ.get("LOG_LEVEL", "info").strip().lower()
    setup_logging(
        bool(flags["json_output"]), LOG_LEVELS.get(level, "info"), "launcher"
    )  # bad: see below
    try:
        config = resolve_config(flags, environ)
    except ConfigError as err:
        log.error("invalid arguments: %s", err)
        return ExitCode.ERROR
    return supervise(config)


def supervise(config: LauncherConfig) -> int:
    """Runs the deployment until a stop signal or a crash; returns the exit code."""
    log.info(
        "launching %s: %d shard(s), %s, port %d",
        config.model_name,
        config.num_shard,
        config.dtype,
        config.port,
    )
    with StopSignal() as stop:
        return launch(
            launch_plan(config), stop, Timing(graceful_timeout=config.graceful_termination_timeout)
        )


app = typer.Typer(add_completion=False, help=__doc__, pretty_exceptions_enable=False)


Opt = typer.Option  # every flag below: (TGI's name, its env var, TGI's default)


@app.command()
def main(
    model_id: Annotated[
        str | None,
        Opt(
            envvar="MODEL_ID",
            help="Local HF directory, .gguf file or Hub repo id; default: SmolLM2-135M-Instruct",
        ),
    ] = None,
    revision: Annotated[str | None, Opt(envvar="REVISION", help="Hub commit or branch")] = None,
    validation_workers: Annotated[
        int, Opt(envvar="VALIDATION_WORKERS", help="Tokenizer workers in the router")
    ] = 2,
    sharded: Annotated[
        str | None,
        Opt(envvar="SHARDED", metavar="true|false", help="Shard the model across processes"),
    ] = None,
    num_shard: Annotated[
        int | None, Opt(envvar="NUM_SHARD", help="Default: entries in CUDA_VISIBLE_DEVICES, else 1")
    ] = None,
    dtype: Annotated[
        str | None, Opt(envvar="DTYPE", help="float32 (default on CPU), bfloat16 or float16")
    ] = None,
    max_concurrent_requests: Annotated[int, Opt(envvar="MAX_CONCURRENT_REQUESTS")] = 128,
    max_best_of: Annotated[int, Opt(envvar="MAX_BEST_OF")] = 2,
    max_stop_sequences: Annotated[int, Opt(envvar="MAX_STOP_SEQUENCES")] = 4,
    max_top_n_tokens: Annotated[int, Opt(envvar="MAX_TOP_N_TOKENS")] = 5,
    max_input_tokens: Annotated[int | None, Opt(envvar="MAX_INPUT_TOKENS")] = None,
    max_input_length: Annotated[
        int | None, Opt(envvar="MAX_INPUT_LENGTH", help="Legacy name of --max-input-tokens")
    ] = None,
    max_total_tokens: Annotated[int | None, Opt(envvar="MAX_TOTAL_TOKENS")] = None,
    waiting_served_ratio: Annotated[float, Opt(envvar="WAITING_SERVED_RATIO")] = 0.3,
    max_batch_prefill_tokens: Annotated[
        int | None, Opt(envvar="MAX_BATCH_PREFILL_TOKENS", help="Default: 4096")
    ] = None,
    max_batch_total_tokens: Annotated[int | None, Opt(envvar="MAX_BATCH_TOTAL_TOKENS")] = None,
    max_waiting_tokens: Annotated[int, Opt(envvar="MAX_WAITING_TOKENS")] = 20,
    max_batch_size: Annotated[int | None, Opt(envvar="MAX_BATCH_SIZE")] = None,
    hostname: Annotated[str, Opt(envvar="HOSTNAME")] = "0.0.0.0",
    port: Annotated[int, Opt("--port", "-p", envvar="PORT")] = 3000,
    shard_uds_path: Annotated[
        str,
        Opt(
            envvar="SHARD_UDS_PATH",
            help="Socket prefix: shard r listens on {path}-{r}",
        ),
    ] = "/tmp/text-generation-server",
    master_addr: Annotated[str, Opt(envvar="MASTER_ADDR")] = "localhost",
    master_port: Annotated[int, Opt(envvar="MASTER_PORT")] = 29500,
    json_output: Annotated[
        bool, Opt("--json-output", envvar="JSON_OUTPUT", help="Log JSON lines")
    ] = False,
    cors_allow_origin: Annotated[
        list[str] | None, Opt(envvar="CORS_ALLOW_ORIGIN", help="Allowed CORS origin (repeatable)")
    ] = None,
    api_key: Annotated[
        str | None, Opt(envvar="API_KEY", help="Bearer token required on inference routes")
    ] = None,
    max_client_batch_size: Annotated[int, Opt(envvar="MAX_CLIENT_BATCH_SIZE")] = 4,
    payload_limit: Annotated[
        int, Opt(envvar="PAYLOAD_LIMIT", help="Maximum request body in bytes")
    ] = 2_000_000,
    enable_prefill_logprobs: Annotated[
        bool, Opt("--enable-prefill-logprobs", envvar="ENABLE_PREFILL_LOGPROBS")
    ] = False,
    graceful_termination_timeout: Annotated[
        float,
        Opt(
            "--graceful-termination-timeout",
            "-g",
            envvar="GRACEFUL_TERMINATION_TIMEOUT",
            help="Seconds the router may drain on SIGTERM before it is killed",
        ),
    ] = 90,
    disable_custom_kernels: Annotated[
        bool,
        Opt(
            "--disable-custom-kernels",
            envvar="DISABLE_CUSTOM_KERNELS",
            help="Accepted for TGI compatibility",
        ),
    ] = False,
    kv_cache_memory: Annotated[
        str,
        Opt(
            envvar="KV_CACHE_MEMORY",
            help="KV cache size: bytes (e.g. 2GiB) or a fraction of free memory",
        ),
    ] = "0.3",
    attention: Annotated[str, Opt(envvar="ATTENTION", help="auto, sdpa, torch or flash")] = "auto",
    block_size: Annotated[int, Opt(envvar="BLOCK_SIZE", help="Tokens per KV block")] = 16,
    cache_dir: Annotated[
        str | None, Opt(envvar="CACHE_DIR", help="Where converted models live")
    ] = None,
) -> None:
    """Starts the shards and the router, and supervises them until a signal or a crash."""
    flags = dict(locals())  # every flag by name; resolve_config turns them into the config
    raise typer.Exit(run(flags, os.environ))
