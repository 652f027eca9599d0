"""Logging set-up shared by the launcher, the router and the shards: plain lines by default,
one JSON object per line (timestamp, level, target, message) with --json-output; and TGI's
LOG_LEVEL, which is a tracing filter (`info`, `warn,text_generation_router=debug`)."""

from __future__ import annotations

import json
import logging
import sys


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": self.formatTime(record),
            "level": record.levelname,
            "target": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


# TGI's level names -> Python's ("trace" has no Python level; "off" logs only the critical).
LOG_LEVELS = {
    "trace": "debug",
    "debug": "debug",
    "info": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
    "critical": "critical",
    "off": "critical",
}
# Targets of a filter that name one of our processes: TGI's crates and modules, or ours.
OUR_TARGETS = ("text_generation", "launcher", "router", "shard")


def python_level(log_filter: str) -> str:
    """The Python level of a LOG_LEVEL filter: comma-separated directives, each a level (the
    default) or `target=level`. Directives for our processes win over the default, the most
    verbose of them; others (a library's) are ignored. ValueError on an unknown level."""
    default, ours = "info", []
    for directive in filter(None, (d.strip().lower() for d in log_filter.split(","))):
        target, _, level = directive.rpartition("=")
        if level not in LOG_LEVELS:
            raise ValueError(f"invalid LOG_LEVEL {log_filter!r}: unknown level {level!r}")
        if not target:
            default = level
        elif target.startswith(OUR_TARGETS):
            ours.append(LOG_LEVELS[level])
    if ours:
        return min(ours, key=lambda name: logging.getLevelName(name.upper()))
    return LOG_LEVELS[default]


def setup_logging(json_output: bool, level: str, process: str) -> None:
    """`process` names the process in plain lines, e.g. "router" or "shard[0]"."""
    handler = logging.StreamHandler(sys.stderr)
    plain = logging.Formatter(f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s")
    handler.setFormatter(JsonFormatter() if json_output else plain)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
