"""Launcher flags: TGI's names, defaults and env vars, validation, and the exact argument lists
handed to `shard prepare`, `shard serve` and the router. Nothing is spawned here."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from click.testing import CliRunner

from launcher import cli
from launcher.cli import ConfigError, LauncherConfig, app, is_memory_budget
from launcher.config import resolve_kv_cache_dtype

PY = sys.executable
OPTIONS = [p for p in app.params if p.opts[0].startswith("--") and p.envvar]

TGI_FLAGS = [
    "--model-id",
    "--revision",
    "--validation-workers",
    "--sharded",
    "--num-shard",
    "--dtype",
    "--max-concurrent-requests",
    "--max-best-of",
    "--max-stop-sequences",
    "--max-top-n-tokens",
    "--max-input-tokens",
    "--max-input-length",
    "--max-total-tokens",
    "--waiting-served-ratio",
    "--max-batch-prefill-tokens",
    "--max-batch-total-tokens",
    "--max-waiting-tokens",
    "--max-batch-size",
    "--hostname",
    "--port",
    "--shard-uds-path",
    "--master-addr",
    "--master-port",
    "--json-output",
    "--cors-allow-origin",
    "--api-key",
    "--max-client-batch-size",
    "--payload-limit",
    "--enable-prefill-logprobs",
    "--graceful-termination-timeout",
    "--disable-custom-kernels",
]
OUR_FLAGS = ["--kv-cache-memory", "--attention", "--block-size", "--cache-dir"]


pytestmark = pytest.mark.usefixtures("clean_env")


def parse(captured: list[LauncherConfig], *args: str, **env: str) -> LauncherConfig:
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == 0, result.output
    return captured[-1]


def parse_error(captured: list[LauncherConfig], *args: str, **env: str) -> str:
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == 1, result.output
    assert not captured
    return result.output


# ----------------------------------------------------------------------------- flags


def test_every_tgi_flag_and_ours_exists() -> None:
    names = {opt for p in OPTIONS for opt in p.opts}
    assert set(TGI_FLAGS + OUR_FLAGS) <= names
    assert {"-p", "-g"} <= {opt for p in OPTIONS for opt in p.opts}


def test_every_flag_reads_its_upper_snake_env_var() -> None:
    for option in OPTIONS:
        assert option.envvar == option.opts[0][2:].upper().replace("-", "_"), option.opts


def test_defaults_match_tgi(captured: list[LauncherConfig]) -> None:
    config = parse(captured)
    assert config == LauncherConfig()
    assert (config.model_id, config.num_shard) == (None, 1)
    assert config.max_batch_prefill_tokens == 4096
    assert config.waiting_served_ratio == 0.3
    assert config.graceful_termination_timeout == 90
    assert config.dtype is None  # the shards choose (the checkpoint's on a GPU, by CPU else)
    assert config.kv_cache_memory is None and config.block_size is None
    assert config.attention == "auto" and config.log_level == "info"
    assert config.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize(
    ("env", "value", "field", "expected"),
    [
        ("MODEL_ID", "/models/llama", "model_id", "/models/llama"),
        ("PORT", "8080", "port", 8080),
        ("HOSTNAME", "127.0.0.1", "hostname", "127.0.0.1"),
        ("MAX_CONCURRENT_REQUESTS", "7", "max_concurrent_requests", 7),
        ("MAX_INPUT_LENGTH", "100", "max_input_tokens", 100),
        ("WAITING_SERVED_RATIO", "1.2", "waiting_served_ratio", 1.2),
        ("JSON_OUTPUT", "true", "json_output", True),
        ("ENABLE_PREFILL_LOGPROBS", "1", "enable_prefill_logprobs", True),
        ("DISABLE_CUSTOM_KERNELS", "true", "disable_custom_kernels", True),
        (
            "CORS_ALLOW_ORIGIN",
            "https://a.com https://b.com",
            "cors_allow_origin",
            ("https://a.com", "https://b.com"),
        ),
        ("API_KEY", "secret", "api_key", "secret"),
        ("GRACEFUL_TERMINATION_TIMEOUT", "5", "graceful_termination_timeout", 5.0),
        ("DTYPE", "bfloat16", "dtype", "bfloat16"),
        ("NUM_SHARD", "2", "num_shard", 2),
        ("CUDA_VISIBLE_DEVICES", "0,1,2", "num_shard", 3),
        ("KV_CACHE_MEMORY", "2GiB", "kv_cache_memory", "2GiB"),
        ("ATTENTION", "sdpa", "attention", "sdpa"),
        ("BLOCK_SIZE", "32", "block_size", 32),
        ("CACHE_DIR", "/cache", "cache_dir", "/cache"),
        ("LOG_LEVEL", "WARN", "log_level", "warning"),
        ("LOG_LEVEL", "trace", "log_level", "debug"),
        ("LOG_LEVEL", "warn,text_generation_router=debug", "log_level", "debug"),  # TGI's filters
        ("LOG_LEVEL", "hyper=debug,error", "log_level", "error"),  # a library's: not ours
        ("PREFIX_CACHING", "0", "prefix_caching", False),
        ("PREFIX_CACHING", "true", "prefix_caching", True),
    ],
)
def test_env_vars(
    captured: list[LauncherConfig], env: str, value: str, field: str, expected: Any
) -> None:
    assert getattr(parse(captured, **{env: value}), field) == expected


def test_flags_win_over_env_vars(captured: list[LauncherConfig]) -> None:
    config = parse(
        captured, "-p", "9000", "--num-shard", "1", PORT="8080", CUDA_VISIBLE_DEVICES="0,1"
    )
    assert (config.port, config.num_shard) == (9000, 1)


def test_short_and_repeated_flags(captured: list[LauncherConfig]) -> None:
    config = parse(
        captured,
        "-p",
        "80",
        "-g",
        "2.5",
        "--cors-allow-origin",
        "https://a.com",
        "--cors-allow-origin",
        "https://b.com",
    )
    assert (config.port, config.graceful_termination_timeout) == (80, 2.5)
    assert config.cors_allow_origin == ("https://a.com", "https://b.com")


@pytest.mark.parametrize(
    ("args", "num_shard"),
    [
        (("--sharded", "true", "--num-shard", "2"), 2),
        (("--sharded", "false"), 1),
        (("--sharded", "false", "--num-shard", "1"), 1),
        (("--num-shard", "3"), 3),
    ],
)
def test_sharded_and_num_shard(
    captured: list[LauncherConfig], args: tuple[str, ...], num_shard: int
) -> None:
    assert parse(captured, *args).num_shard == num_shard


def test_sharded_true_counts_cuda_visible_devices(captured: list[LauncherConfig]) -> None:
    assert parse(captured, "--sharded", "true", CUDA_VISIBLE_DEVICES="0,1").num_shard == 2


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ("--max-input-tokens", "10", "--max-input-length", "10"),
            {},
            "Both `max_input_tokens` and `max_input_length` are set",
        ),
        (
            ("--max-input-tokens", "100", "--max-total-tokens", "100"),
            {},
            "`max_input_tokens`(100) must be < `max_total_tokens`(100)",
        ),
        (
            ("--max-input-length", "200", "--max-total-tokens", "100"),
            {},
            "`max_input_tokens`(200) must be < `max_total_tokens`(100)",
        ),
        (
            ("--max-total-tokens", "200", "--max-batch-total-tokens", "100"),
            {},
            "`max_total_tokens` must be <= `max_batch_total_tokens`",
        ),
        (
            ("--max-batch-prefill-tokens", "200", "--max-batch-total-tokens", "100"),
            {},
            "`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`",
        ),
        (("--sharded", "false", "--num-shard", "2"), {}, "`sharded` is false but `num_shard` is 2"),
        (("--sharded", "false"), {"CUDA_VISIBLE_DEVICES": "0,1"}, "`sharded` is false"),
        (("--sharded", "true", "--num-shard", "1"), {}, "`sharded` is true but `num_shard` is 1"),
        (("--sharded", "true"), {}, "`sharded` is true but `num_shard` is 1"),
        (("--sharded", "maybe"), {}, "`sharded` must be true or false"),
        (("--num-shard", "0"), {}, "`num_shard` cannot be < 1"),
        (("--validation-workers", "0"), {}, "`validation_workers` must be > 0"),
        (("--max-batch-size", "0"), {}, "`max_batch_size` must be > 0"),
        (("--dtype", "float64"), {}, "`dtype` must be one of float32, bfloat16, float16"),
        (("--attention", "fast"), {}, "`attention` must be one of auto, sdpa, torch, flash"),
        (("--kv-cache-memory", "lots"), {}, "invalid `kv_cache_memory` 'lots'"),
        (("--block-size", "0"), {}, "`block_size` must be > 0"),
        (("-g", "-1"), {}, "`graceful_termination_timeout` must be >= 0"),
        ((), {"LOG_LEVEL": "verbose"}, "invalid LOG_LEVEL 'verbose'"),
        ((), {"PREFIX_CACHING": "maybe"}, "`PREFIX_CACHING` must be true or false"),
    ],
)
def test_invalid_arguments_exit_1_with_a_clear_message(
    captured: list[LauncherConfig], args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    output = parse_error(captured, *args, **env)
    assert "invalid arguments" in output and message in output


def test_json_output_logs_errors_as_json(captured: list[LauncherConfig]) -> None:
    output = parse_error(captured, "--json-output", "--num-shard", "0")
    entry = json.loads(output.strip().splitlines()[-1])
    assert entry["level"] == "ERROR" and "`num_shard` cannot be < 1" in entry["message"]


def test_config_is_frozen_and_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "1234")
    config = LauncherConfig()
    assert config.port == 3000
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]
    with pytest.raises(ConfigError, match="max_batch_total_tokens"):
        LauncherConfig(max_total_tokens=10, max_batch_total_tokens=5)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("0.3", True),
        ("1", True),
        ("2GiB", True),
        ("500 MB", True),
        ("1000000", True),
        ("0", False),
        ("-1", False),
        ("2TB", False),
        ("lots", False),
        ("", False),
    ],
)
def test_memory_budget_grammar_matches_the_shard(text: str, ok: bool) -> None:
    assert is_memory_budget(text) is ok


# ----------------------------------------------------------------------------- commands


def test_prepare_command() -> None:
    assert cli.prepare_command(LauncherConfig()).argv == (PY, "-m", "shard", "prepare")
    config = LauncherConfig(
        model_id="org/model", revision="main", cache_dir="/cache", json_output=True
    )
    override = LauncherConfig(model_id="org/model", weights_cache_override="/weights")
    assert cli.prepare_command(override).argv[-2:] == ("--model-id", "/weights")
    assert cli.prepare_command(LauncherConfig(huggingface_hub_cache="/hub")).env == {
        "HUGGINGFACE_HUB_CACHE": "/hub",
        "HF_HUB_CACHE": "/hub",
    }
    assert cli.prepare_command(config).argv == (
        PY,
        "-m",
        "shard",
        "prepare",
        "--model-id",
        "org/model",
        "--revision",
        "main",
        "--cache-dir",
        "/cache",
        "--json-output",
    )


def test_shard_command() -> None:
    config = LauncherConfig(
        num_shard=2,
        dtype="bfloat16",
        attention="sdpa",
        block_size=32,
        kv_cache_memory="2GiB",
        shard_uds_path="/tmp/tgi",
        json_output=True,
        master_addr="10.0.0.1",
        master_port=1234,
        log_level="debug",
    )
    command = cli.shard_command(config, "/models/m", rank=1)
    assert command.name == "shard 1"
    assert command.argv == (
        PY,
        "-m",
        "shard",
        "serve",
        "--model-id",
        "/models/m",
        "--uds-path",
        "/tmp/tgi",
        "--rank",
        "1",
        "--world-size",
        "2",
        "--dtype",
        "bfloat16",
        "--prefix-caching",
        "--attention",
        "sdpa",
        "--block-size",
        "32",
        "--kv-cache-memory",
        "2GiB",
        "--model-impl",
        "auto",
        "--exit-with-parent",
        "--json-output",
        "--log-level",
        "debug",
        "--otlp-service-name",
        "text-generation-inference.router",
    )
    assert command.env == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "1234",
        "LOG_LEVEL": "debug",
    }
    default = cli.shard_command(LauncherConfig(), "/models/m", rank=0).argv
    assert "--json-output" not in default and ("--log-level", "info") == default[-4:-2]


def test_shard_command_with_the_tgi_settings_it_carries() -> None:
    config = LauncherConfig(
        rope_scaling="dynamic",
        rope_factor=2.0,
        watermark_gamma=0.25,
        watermark_delta=1.5,
        otlp_endpoint="http://otel:4317",
        otlp_service_name="svc",
        huggingface_hub_cache="/hub",
        disable_custom_kernels=True,
    )
    command = cli.shard_command(config, "/models/m", rank=0)
    tail = command.argv[command.argv.index("--log-level") + 2 :]
    assert tail == (
        "--rope-scaling",
        "dynamic",
        "--rope-factor",
        "2.0",
        "--watermark-gamma",
        "0.25",
        "--watermark-delta",
        "1.5",
        "--otlp-endpoint",
        "http://otel:4317",
        "--otlp-service-name",
        "svc",
    )
    assert command.env["DISABLE_CUSTOM_KERNELS"] == "true"
    assert command.env["HF_HUB_CACHE"] == command.env["HUGGINGFACE_HUB_CACHE"] == "/hub"
    assert "DISABLE_CUSTOM_KERNELS" not in cli.shard_command(LauncherConfig(), "/m", 0).env


def test_router_command_defaults() -> None:
    command = cli.router_command(LauncherConfig(), "/models/m")
    assert command.name == "webserver"
    assert command.argv == (
        PY,
        "-m",
        "router",
        "--model-id",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "--tokenizer-name",
        "/models/m",
        "--master-shard-uds-path",
        "/tmp/text-generation-server-0",
        "--hostname",
        "0.0.0.0",
        "--port",
        "3000",
        "--max-concurrent-requests",
        "128",
        "--max-best-of",
        "2",
        "--max-stop-sequences",
        "4",
        "--max-top-n-tokens",
        "5",
        "--max-batch-prefill-tokens",
        "4096",
        "--waiting-served-ratio",
        "0.3",
        "--max-waiting-tokens",
        "20",
        "--validation-workers",
        "2",
        "--max-client-batch-size",
        "4",
        "--payload-limit",
        "2000000",
        "--graceful-shutdown-timeout",
        "90.0",
        "--prometheus-port",
        "9000",
        "--otlp-service-name",
        "text-generation-inference.router",
    )
    assert command.env == {"LOG_LEVEL": "info", "COMPUTE_TYPE": "1-cpu"}


def test_router_command_with_every_optional_flag() -> None:
    config = LauncherConfig(
        model_id="org/model",
        hostname="127.0.0.1",
        port=8080,
        shard_uds_path="/tmp/s",
        max_input_tokens=100,
        max_total_tokens=200,
        max_batch_total_tokens=10000,
        max_batch_size=8,
        api_key="k",
        cors_allow_origin=("https://a", "https://b"),
        json_output=True,
        enable_prefill_logprobs=True,
        graceful_termination_timeout=5,
        prometheus_port=9100,
        otlp_endpoint="http://otel:4317",
        tokenizer_config_path="/cfg/tokenizer_config.json",
    )
    command = cli.router_command(config, "/models/m")
    argv = command.argv
    assert argv[:9] == (
        PY,
        "-m",
        "router",
        "--model-id",
        "org/model",
        "--tokenizer-name",
        "/models/m",
        "--master-shard-uds-path",
        "/tmp/s-0",
    )
    assert argv[argv.index("--graceful-shutdown-timeout") :] == (
        "--graceful-shutdown-timeout",
        "5",
        "--prometheus-port",
        "9100",
        "--otlp-endpoint",
        "http://otel:4317",
        "--otlp-service-name",
        "text-generation-inference.router",
        "--tokenizer-config-path",
        "/cfg/tokenizer_config.json",
        "--max-input-tokens",
        "100",
        "--max-total-tokens",
        "200",
        "--max-batch-total-tokens",
        "10000",
        "--max-batch-size",
        "8",
        "--cors-allow-origin",
        "https://a",
        "--cors-allow-origin",
        "https://b",
        "--json-output",
        "--enable-prefill-logprobs",
    )


def test_router_api_key_travels_in_the_environment_not_the_command_line() -> None:
    """Any user of the machine can read a process's command line (ps, /proc/<pid>/cmdline)."""
    command = cli.router_command(LauncherConfig(api_key="s3cret-key"), "/models/m")
    assert not any("s3cret-key" in arg for arg in command.argv)
    assert "--api-key" not in command.argv
    assert command.env["API_KEY"] == "s3cret-key"
    assert "API_KEY" not in cli.router_command(LauncherConfig(), "/models/m").env


def test_launch_plan_has_one_shard_and_socket_per_rank() -> None:
    plan = cli.launch_plan(LauncherConfig(num_shard=3, shard_uds_path="/tmp/x"))
    assert plan.shard_sockets == ["/tmp/x-0", "/tmp/x-1", "/tmp/x-2"]
    assert [c.name for c in plan.shards("/m")] == ["shard 0", "shard 1", "shard 2"]
    assert plan.router("/m").argv[plan.router("/m").argv.index("--tokenizer-name") + 1] == "/m"


def test_batch_invariance_reaches_the_shards_only_when_asked(captured) -> None:
    assert parse(captured).batch_invariant is None  # the shards decide: CPU on, GPU off
    assert parse(captured, "--batch-invariant", "false").batch_invariant is False
    assert parse(captured, BATCH_INVARIANT="true").batch_invariant is True
    argv = cli.shard_command(LauncherConfig(batch_invariant=False), "/models/m", rank=0).argv
    assert argv[argv.index("--batch-invariant") + 1] == "false"
    assert "--batch-invariant" not in cli.shard_command(LauncherConfig(), "/m", rank=0).argv


def test_kv_cache_dtype_reaches_the_shards_and_tgis_fp8_keeps_the_models() -> None:
    flags = {"kv_cache_dtype": "float16"}
    argv = cli.shard_command(LauncherConfig(**flags), "/models/m", rank=0).argv
    assert argv[argv.index("--kv-cache-dtype") + 1] == "float16"
    assert "--kv-cache-dtype" not in cli.shard_command(LauncherConfig(), "/m", rank=0).argv
    assert resolve_kv_cache_dtype("auto") is None and resolve_kv_cache_dtype(None) is None
    assert resolve_kv_cache_dtype("fp8_e4m3fn") is None
    assert resolve_kv_cache_dtype("bfloat16") == "bfloat16"
