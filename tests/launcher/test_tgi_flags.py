"""Every flag and env var of TGI's launcher is accepted, so a TGI deployment file works as it is:
used where it means something here, logged where it does not, refused where ignoring it would
mislead. The list below is TGI's `text-generation-launcher --help` (3.x), written out here on
purpose rather than read from launcher/flags.py, so a flag dropped from our table fails."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from launcher import cli, config
from launcher.cli import LauncherConfig, app
from launcher.config import count_visible_devices
from launcher.flags import FLAGS, markdown_table

# flag -> a value to pass (TGI's default where it has one); None marks a boolean switch.
TGI_FLAGS: dict[str, str | None] = {
    "--model-id": "bigscience/bloom-560m",
    "--revision": "main",
    "--validation-workers": "2",
    "--sharded": "false",
    "--num-shard": "1",
    "--quantize": "eetq",
    "--speculate": "2",
    "--dtype": "bfloat16",
    "--kv-cache-dtype": "fp8_e4m3fn",
    "--trust-remote-code": None,
    "--max-concurrent-requests": "128",
    "--max-best-of": "2",
    "--max-stop-sequences": "4",
    "--max-top-n-tokens": "5",
    "--max-input-tokens": "1024",
    "--max-input-length": "1024",
    "--max-total-tokens": "2048",
    "--waiting-served-ratio": "0.3",
    "--max-batch-prefill-tokens": "4096",
    "--max-batch-total-tokens": "16384",
    "--max-waiting-tokens": "20",
    "--max-batch-size": "32",
    "--cuda-graphs": "1,2,4,8,16,32",
    "--hostname": "0.0.0.0",
    "--port": "3000",
    "--prometheus-port": "9000",
    "--shard-uds-path": "/tmp/text-generation-server",
    "--master-addr": "localhost",
    "--master-port": "29500",
    "--huggingface-hub-cache": "/data/hub",
    "--weights-cache-override": "/weights",
    "--disable-custom-kernels": None,
    "--cuda-memory-fraction": "1.0",
    "--rope-scaling": "dynamic",
    "--rope-factor": "2.0",
    "--json-output": None,
    "--otlp-endpoint": "http://localhost:4317",
    "--otlp-service-name": "text-generation-inference.router",
    "--cors-allow-origin": "https://example.com",
    "--api-key": "secret",
    "--watermark-gamma": "0.5",
    "--watermark-delta": "2.0",
    "--ngrok": None,
    "--ngrok-authtoken": "token",
    "--ngrok-edge": "edge",
    "--tokenizer-config-path": "/config/tokenizer_config.json",
    "--disable-grammar-support": None,
    "--env": None,
    "--max-client-batch-size": "4",
    "--lora-adapters": "org/adapter",
    "--usage-stats": "on",
    "--payload-limit": "2000000",
    "--enable-prefill-logprobs": None,
    "--graceful-termination-timeout": "90",
}
REFUSED = {"--trust-remote-code": "own model code", "--lora-adapters": "LoRA adapters"}
NO_ENV = {"--env"}  # TGI's -e/--env has no env var
ALIASES = {"--max-input-length"}  # setting it and --max-input-tokens is an error, as in TGI


def env_name(flag: str) -> str:
    return flag[2:].upper().replace("-", "_")


pytestmark = pytest.mark.usefixtures("clean_env")


def invoke(*args: str, **env: str):
    return CliRunner().invoke(app, list(args), env=env)


def as_args(flags: dict[str, str | None]) -> list[str]:
    return [part for flag, value in flags.items() for part in (flag, value) if part is not None]


def test_the_list_is_tgis_54_flags_and_our_table_has_each() -> None:
    assert len(TGI_FLAGS) == 54
    ours = {f"--{flag.name}" for flag in FLAGS}
    assert set(TGI_FLAGS) <= ours


@pytest.mark.parametrize("flag", [f for f in TGI_FLAGS if f not in REFUSED])
def test_each_tgi_flag_alone_is_accepted(captured: list[LauncherConfig], flag: str) -> None:
    result = invoke(*as_args({flag: TGI_FLAGS[flag]}))
    assert result.exit_code == 0, result.output
    assert len(captured) == 1


def test_every_tgi_flag_together_is_accepted(captured: list[LauncherConfig]) -> None:
    accepted = {f: v for f, v in TGI_FLAGS.items() if f not in REFUSED.keys() | ALIASES}
    result = invoke(*as_args(accepted))
    assert result.exit_code == 0, result.output
    config = captured[-1]
    assert (config.rope_scaling, config.rope_factor) == ("dynamic", 2.0)
    assert config.otlp_endpoint == "http://localhost:4317"
    assert config.tokenizer_config_path == "/config/tokenizer_config.json"
    assert (config.huggingface_hub_cache, config.weights_cache_override) == (
        "/data/hub",
        "/weights",
    )
    assert (config.watermark_gamma, config.watermark_delta) == (0.5, 2.0)
    assert config.prometheus_port == 9000 and config.disable_custom_kernels
    assert config.quantize == "eetq" and config.max_input_tokens == 1024


def test_every_tgi_env_var_is_accepted(captured: list[LauncherConfig]) -> None:
    env = {
        env_name(flag): "true" if value is None else value
        for flag, value in TGI_FLAGS.items()
        if flag not in REFUSED.keys() | ALIASES | NO_ENV
    }
    result = invoke(**env)
    assert result.exit_code == 0, result.output
    config = captured[-1]
    assert config.model_id == "bigscience/bloom-560m" and config.json_output
    assert config.otlp_endpoint == "http://localhost:4317" and config.rope_factor == 2.0
    assert config.cors_allow_origin == ("https://example.com",)


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_refused_flags_exit_1_and_say_why(captured: list[LauncherConfig], flag: str) -> None:
    result = invoke(*as_args({flag: TGI_FLAGS[flag]}))
    assert result.exit_code == 1 and not captured
    assert f"`{flag}` is refused" in result.output and REFUSED[flag] in result.output
    result = invoke(**{env_name(flag): "true" if TGI_FLAGS[flag] is None else "x/y"})
    assert result.exit_code == 1 and not captured


@pytest.mark.parametrize(
    ("args", "logged"),
    [
        (("--speculate", "3"), "No speculative decoding"),
        (("--kv-cache-dtype", "fp8_e5m2"), "the cache keeps the model's dtype"),
        (("--ngrok",), "No ngrok tunnel"),
        (("--usage-stats", "off"), "never sends usage statistics"),
    ],
)
def test_not_applicable_flags_are_logged_when_set(
    captured: list[LauncherConfig], args: tuple[str, ...], logged: str
) -> None:
    result = invoke(*args)
    assert result.exit_code == 0 and logged in result.output


def test_not_applicable_flags_at_their_default_stay_quiet(captured: list[LauncherConfig]) -> None:
    result = invoke("--usage-stats", "on", "--cuda-memory-fraction", "1.0")
    assert result.exit_code == 0 and "not applicable" not in result.output


def test_tgi_choices_are_checked_as_tgi_checks_them(captured: list[LauncherConfig]) -> None:
    assert invoke("--kv-cache-dtype", "fp16").exit_code == 2
    assert invoke("--usage-stats", "maybe").exit_code == 2
    assert invoke("--rope-scaling", "yarn").exit_code == 2
    assert invoke("--rope-factor", "0").exit_code == 1
    assert invoke("--cuda-memory-fraction", "1.5").exit_code == 1
    assert invoke("--cuda-graphs", "1,two").exit_code == 1


def test_cuda_graphs_reach_the_shards(captured: list[LauncherConfig]) -> None:
    assert invoke("--cuda-graphs", "1,2,4").exit_code == 0
    argv = cli.shard_command(captured[-1], "/m", rank=0).argv
    assert argv[argv.index("--cuda-graphs") + 1] == "1,2,4"
    assert "--cuda-graphs" not in cli.shard_command(LauncherConfig(), "/m", 0).argv


def test_cuda_memory_fraction_reaches_the_shards(captured: list[LauncherConfig]) -> None:
    assert invoke("--cuda-memory-fraction", "0.5").exit_code == 0
    command = cli.shard_command(captured[-1], "/m", rank=0)
    i = command.argv.index("--cuda-memory-fraction")
    assert command.argv[i + 1] == "0.5"
    assert "--cuda-memory-fraction" not in cli.shard_command(LauncherConfig(), "/m", 0).argv


@pytest.mark.parametrize("value", ["paged", "flashdecoding", "flashinfer"])
def test_tgi_attention_values_mean_auto(captured: list[LauncherConfig], value: str) -> None:
    assert invoke(ATTENTION=value).exit_code == 0
    assert captured[-1].attention == "auto"


def test_env_prints_the_runtime_then_launches(captured: list[LauncherConfig]) -> None:
    result = invoke("-e")
    assert result.exit_code == 0 and len(captured) == 1
    assert "Python:" in result.output and "torch:" in result.output and "GPUs:" in result.output


def test_version(captured: list[LauncherConfig]) -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and "version" in result.output and not captured


@pytest.mark.parametrize(
    ("env", "gpus", "expected"),
    [
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, 8, 2),
        ({"CUDA_VISIBLE_DEVICES": "3", "NVIDIA_VISIBLE_DEVICES": "0,1"}, 8, 1),
        ({"NVIDIA_VISIBLE_DEVICES": "0,1,2"}, 8, 3),
        ({"NVIDIA_VISIBLE_DEVICES": "all"}, 4, 4),  # NVIDIA's images set `all`
        ({"NVIDIA_VISIBLE_DEVICES": "all"}, None, None),  # no nvidia-smi: one shard
        ({"NVIDIA_VISIBLE_DEVICES": "void"}, 2, 2),
        ({"ZE_AFFINITY_MASK": "0,1"}, 8, 2),
        ({}, 8, None),
    ],
)
def test_visible_devices_are_counted_as_tgi_counts_them(
    env: dict[str, str], gpus: int | None, expected: int | None
) -> None:
    assert count_visible_devices(env, count_gpus=lambda: gpus) == expected


def test_without_any_variable_the_driver_counts(
    captured: list[LauncherConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "nvidia_smi_count", lambda: 4)
    assert invoke().exit_code == 0
    assert captured[-1].num_shard == 4
    assert invoke(CUDA_VISIBLE_DEVICES="0").exit_code == 0
    assert captured[-1].num_shard == 1


def test_nvidia_visible_devices_all_asks_nvidia_smi(
    captured: list[LauncherConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "nvidia_smi_count", lambda: 2)
    assert invoke(NVIDIA_VISIBLE_DEVICES="all").exit_code == 0
    assert captured[-1].num_shard == 2


def test_compute_type_comes_from_compute_type_else_the_shards(
    captured: list[LauncherConfig],
) -> None:
    assert invoke("--num-shard", "2").exit_code == 0
    assert captured[-1].compute_type == "2-cpu"
    assert invoke(COMPUTE_TYPE="1-nvidia-h200").exit_code == 0
    assert captured[-1].compute_type == "1-nvidia-h200"


def test_the_docs_table_is_the_flag_table() -> None:
    """docs/launcher-flags.md holds `python -m launcher.flags`'s output: regenerate it there."""
    docs = Path(__file__).parents[2] / "docs" / "launcher-flags.md"
    assert markdown_table() in docs.read_text()
