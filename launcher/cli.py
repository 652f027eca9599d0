"""`launcher`: TGI's launcher flags (launcher/flags.py) -> one validated `LauncherConfig` ->
the commands for `shard prepare`, the shards and the router -> `processes.launch`.

Every flag keeps TGI's name and default and also reads its upper-snake environment variable
(`--max-concurrent-requests` / `MAX_CONCURRENT_REQUESTS`), so TGI deployment files work as they
are. The environment is read when the command runs, never at import time.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import click

from common.logs import python_level, setup_logging
from launcher.commands import launch_plan, prepare_command, router_command, shard_command
from launcher.config import (
    ConfigError,
    LauncherConfig,
    is_memory_budget,
    resolve_config,
)
from launcher.environment import runtime_env
from launcher.flags import FLAGS, click_option
from launcher.processes import ExitCode, StopSignal, Timing, launch

# Re-exported: the config lives in `launcher.config`, the commands in `launcher.commands`.
__all__ = [
    "ConfigError",
    "LauncherConfig",
    "app",
    "is_memory_budget",
    "launch_plan",
    "main",
    "prepare_command",
    "resolve_config",
    "router_command",
    "run",
    "shard_command",
    "supervise",
]

log = logging.getLogger("launcher")


def run(flags: Mapping[str, Any], environ: Mapping[str, str]) -> int:
    """Validates the flags, then launches and supervises; returns the exit code."""
    try:
        level = python_level(environ.get("LOG_LEVEL", "info"))
    except ValueError:
        level = "info"  # resolve_config refuses it below, logged at this level
    setup_logging(bool(flags["json_output"]), level, "launcher")
    try:
        config = resolve_config(flags, environ)
    except ConfigError as err:
        log.error("invalid arguments: %s", err)
        return ExitCode.ERROR
    return supervise(config)


def supervise(config: LauncherConfig) -> int:
    """Runs the deployment until a stop signal or a crash; returns the exit code."""
    log.info(
        "launching %s: %d shard(s), %s, quantize %s, port %d",
        config.model_name,
        config.num_shard,
        config.dtype or "auto",
        config.quantize or "default",
        config.port,
    )
    with StopSignal() as stop:
        return launch(
            launch_plan(config), stop, Timing(graceful_timeout=config.graceful_termination_timeout)
        )


def print_env(environ: Mapping[str, str]) -> None:
    """TGI's `--env`: what a bug report needs about this machine, then the launch goes on."""
    for name, value in runtime_env(environ).items():
        print(f"{name}: {value}", flush=True)


def _main(**flags: Any) -> None:
    """Starts the shards and the router, and supervises them until a signal or a crash."""
    if flags["env"]:
        print_env(os.environ)
    sys.exit(run(flags, os.environ))


def build_command() -> click.Command:
    """The `launcher` command, its options built from the declared flag table."""
    return click.Command(
        "launcher",
        params=[click_option(flag) for flag in FLAGS],
        callback=_main,
        help=__doc__,
        context_settings={"max_content_width": 100},
    )


app = click.version_option(package_name="textgen-server")(build_command())
main = app  # the console scripts' entry point
