"""Process lifecycle: SIGTERM drains in-flight streams and exits 0; a killed shard takes the
whole server down with a non-zero exit and no process left behind."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import PROMPTS, Launcher
from sse import stream


def test_sigterm_lets_streams_finish_and_exits_zero():
    launcher = Launcher("drain")
    try:
        body = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 60, "details": True}}
        first_tokens = []

        def run():
            events = stream(f"{launcher.url}/generate_stream", body)
            first_tokens.append(next(events))
            return [first_tokens[-1], *events]

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(run) for _ in range(4)]
            while len(first_tokens) < 4:
                time.sleep(0.05)
            launcher.process.send_signal(signal.SIGTERM)
            results = [f.result(timeout=120) for f in futures]
        for events in results:
            assert events[-1]["details"]["finish_reason"] in ("length", "eos_token"), events[-1]
            assert len(events) == events[-1]["details"]["generated_tokens"]
        assert launcher.process.wait(60) == 0
        assert launcher.descendants() == []
    finally:
        launcher.stop()


def test_killing_the_shard_stops_everything_with_an_error():
    launcher = Launcher("crash")
    try:
        children = launcher.descendants()
        shard = next(
            p
            for p in children
            if b"shard" in open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")[2:4]
        )
        os.kill(shard, signal.SIGKILL)
        assert launcher.process.wait(60) != 0
        time.sleep(0.5)
        assert launcher.descendants() == []
    finally:
        launcher.stop()
