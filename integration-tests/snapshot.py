"""Stored JSON answers: a test compares a response with its snapshot, so a change in output or
shape is seen. `SNAPSHOT_UPDATE=1 make test` rewrites them (review the diff before committing).
Logprobs are compared with a tolerance; everything else exactly."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

SNAPSHOTS = Path(__file__).parent / "snapshots"


def _close(a, b, path: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for key in a:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-3), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_snapshot(name: str, value) -> None:
    path = SNAPSHOTS / f"{name}.json"
    if os.environ.get("SNAPSHOT_UPDATE") == "1" or not path.exists():
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
        if os.environ.get("SNAPSHOT_UPDATE") != "1":
            raise AssertionError(f"snapshot {path.name} was missing and has been written; rerun")
        return
    _close(value, json.loads(path.read_text()), name)
