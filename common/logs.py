"""Logging set-up shared by the launcher, the router and the shards: plain lines by default,
one JSON object per line (timestamp, level, target, message) with --json-output."""

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


def setup_logging(json_output: bool, level: str, process: str) -> None:
    """`process` names the process in plain lines, e.g. "router" or "shard[0]"."""
    handler = logging.StreamHandler(sys.stderr)
    plain = logging.Formatter(f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s")
    handler.setFormatter(JsonFormatter() if json_output else plain)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
