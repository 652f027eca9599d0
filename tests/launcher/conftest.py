"""What the launcher's parser tests share: an environment without any flag's variable (nor
GPUs), logging restored after, and the configs the CLI would launch instead of launching."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from launcher import cli
from launcher import config as config_module
from launcher.cli import LauncherConfig, app

# Every variable the launcher reads: its flags' and the few it reads besides.
ENV_VARS = [p.envvar for p in app.params if isinstance(p.envvar, str)] + [
    "LOG_LEVEL",
    "PREFIX_CACHING",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "ZE_AFFINITY_MASK",
    "COMPUTE_TYPE",
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(config_module, "nvidia_smi_count", lambda: None)  # no GPUs here
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[LauncherConfig]:
    """The configs the CLI would launch, instead of launching them."""
    configs: list[LauncherConfig] = []
    monkeypatch.setattr(cli, "supervise", lambda config: configs.append(config) or 0)
    return configs
