"""The router's command line (what the launcher passes it) becomes one RouterConfig."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

from router import cli
from router.config import RouterConfig


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[RouterConfig]:
    configs: list[RouterConfig] = []

    async def fake_serve(config: RouterConfig) -> None:
        configs.append(config)

    monkeypatch.setattr(cli, "serve", fake_serve)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield configs
    root.handlers[:] = handlers
    root.setLevel(level)


def test_flags_become_the_config(captured: list[RouterConfig]) -> None:
    args = [
        "--tokenizer-name", "/models/m", "--hostname", "my-pod", "--port", "8080",
        "--cors-allow-origin", "https://a", "--cors-allow-origin", "https://b",
        "--prometheus-port", "9100", "--tokenizer-config-path", "/cfg.json",
        "--otlp-endpoint", "http://otel:4317", "--max-batch-size", "8",
    ]  # fmt: skip
    result = CliRunner().invoke(cli.app, args, env={"COMPUTE_TYPE": "2-cpu", "API_KEY": "k"})
    assert result.exit_code == 0, result.output
    config = captured[-1]
    assert config.tokenizer_dir == "/models/m" and config.hostname == "0.0.0.0"
    assert config.cors_allow_origin == ("https://a", "https://b") and config.port == 8080
    assert (config.prometheus_port, config.tokenizer_config_path) == (9100, "/cfg.json")
    assert config.otlp_endpoint == "http://otel:4317" and config.max_batch_size == 8
    assert (config.compute_type, config.api_key) == ("2-cpu", "k")


def test_invalid_values_exit_1(captured: list[RouterConfig]) -> None:
    args = ["--tokenizer-name", "/m", "--max-input-tokens", "10", "--max-total-tokens", "5"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 1 and not captured
