"""The GPU device check, run in its smoke mode (tiny models on the CPU, 1 and 4 streams), so the
script that a GPU machine gets once is known to work end to end: checkpoints, greedy agreement,
a real launcher under load, transformers' generate() and the report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_run(tmp_path) -> None:
    script = [sys.executable, str(ROOT / "scripts" / "gpu_check.py")]
    env = {**os.environ, "GPU_CHECK_WORK": str(tmp_path / "models")}
    subprocess.run([*script, "prepare", str(tmp_path / "in")], check=True, env=env, cwd=ROOT)
    done = subprocess.run(
        [*script, "run", str(tmp_path / "in"), str(tmp_path / "out"), "--smoke"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| smollm2-135m | float32 | 100.0% |" in report
    assert "| llama-1b | float32 | 100.0% |" in report
    assert "| 1 |" in report and "| 4 |" in report and "| batch 4 |" in report
    assert "seeded draws reproduce" in report
    assert "same bits alone and among 15 others" in report
    rows = [line for line in report.splitlines() if line.startswith("| 1 |")]
    assert rows and rows[0].split("|")[5].strip() == "0"  # no errors at 1 stream
