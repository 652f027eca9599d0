"""`--num-shard 3` serves SmolLM2-135M (9 heads, 3 KV heads) from three processes with the
same answers as one; `--num-shard 2` cannot split it and says so; a dead rank takes the whole
server down with no process left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import PROMPTS, ROOT, Launcher, free_port
from sse import stream, stream_tokens


@pytest.fixture(scope="module")
def tp3():
    handle = Launcher("tp3", "--num-shard", "3")
    yield handle
    handle.stop()


def shard_pids(launcher: Launcher) -> list[int]:
    pids = []
    for pid in launcher.descendants():
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except FileNotFoundError:
            continue
        if argv[2:4] == [b"shard", b"serve"]:
            pids.append(pid)
    return pids


def test_three_shards_give_the_greedy_tokens_of_one(tp3, expected_greedy):
    assert len(shard_pids(tp3)) == 3
    for prompt in PROMPTS:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 32, "details": True}}
        out = requests.post(f"{tp3.url}/generate", json=body, timeout=120).json()
        assert [t["id"] for t in out["details"]["tokens"]] == expected_greedy[prompt], prompt


def test_three_shards_stream_concurrently(tp3, expected_greedy):
    prompts = PROMPTS * 2
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: stream_tokens(tp3.url, p)[0], prompts))
    for prompt, ids in zip(prompts, results):
        assert ids == expected_greedy[prompt], prompt


def test_seeded_sampling_is_identical_to_one_shard(tp3, launcher):
    body = {
        "inputs": PROMPTS[6],
        "parameters": {
            "max_new_tokens": 24,
            "do_sample": True,
            "temperature": 0.8,
            "top_p": 0.9,
            "seed": 11,
            "details": True,
        },
    }
    one = requests.post(f"{launcher.url}/generate", json=body, timeout=120).json()
    three = requests.post(f"{tp3.url}/generate", json=body, timeout=120).json()
    assert [t["id"] for t in three["details"]["tokens"]] == [
        t["id"] for t in one["details"]["tokens"]
    ]


def test_two_shards_cannot_split_the_model():
    uds = f"/tmp/textgen-it-tp2-{os.getpid()}"
    cmd = [
        sys.executable,
        "-m",
        "launcher",
        "--num-shard",
        "2",
        "--port",
        str(free_port()),
        "--shard-uds-path",
        uds,
        "--master-port",
        str(free_port()),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "cannot be split over 2 shards" in result.stderr


def test_killing_one_rank_mid_stream_stops_everything():
    launcher = Launcher("tp3kill", "--num-shard", "3")
    try:
        events = stream(
            f"{launcher.url}/generate_stream",
            {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 400}},
        )
        next(events)
        os.kill(shard_pids(launcher)[1], signal.SIGKILL)
        rest = list(events)
        assert "error" in rest[-1], rest[-1:]
        assert launcher.process.wait(120) != 0
        time.sleep(0.5)
        assert launcher.descendants() == []
    finally:
        launcher.stop()


def test_a_hung_rank_is_detected_by_the_collective_timeout():
    launcher = Launcher("tp3hang", "--num-shard", "3", env={"COLLECTIVE_TIMEOUT": "10"})
    try:
        os.kill(shard_pids(launcher)[2], signal.SIGSTOP)  # alive but stuck
        body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 5}}
        response = requests.post(f"{launcher.url}/generate", json=body, timeout=120)
        assert response.status_code == 424, response.text
        assert launcher.process.wait(120) != 0
        time.sleep(0.5)
        assert launcher.descendants() == []
    finally:
        launcher.stop()
