"""Starts the real launcher as a process (shards + router on the default model) and hands
tests its URL. Each launcher gets its own port and socket path; every process it started is
gone when the fixture ends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from shard.quant.quality import PROMPTS  # noqa: F401 (the oracle's prompts; tests import them here)

ROOT = Path(__file__).resolve().parent.parent


# The oracle: transformers in float32 (the default may be bfloat16) on dense weights (the
# embedded GGUF model is quantized by default).
ORACLE = ("--dtype", "float32", "--quantize", "none")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launcher:
    def __init__(
        self,
        name: str,
        *args: str,
        startup_timeout: float = 300.0,
        env: dict[str, str] | None = None,
        oracle: bool = True,
    ):
        """oracle: dense float32 weights, as transformers has them; False: the defaults."""
        self.port = free_port()
        self.uds = f"/tmp/textgen-it-{name}-{os.getpid()}"
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "launcher",
            "--port",
            str(self.port),
            "--hostname",
            "127.0.0.1",
            "--shard-uds-path",
            self.uds,
            "--master-port",
            str(free_port()),
            "--max-batch-prefill-tokens",
            "512",
            "--kv-cache-memory",
            "512MiB",
            *(ORACLE if oracle else ()),
            *args,
        ]
        self.process = subprocess.Popen(
            cmd, cwd=ROOT, start_new_session=True, env={**os.environ, **(env or {})}
        )
        self.wait_healthy(startup_timeout)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.process.returncode} during startup")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        raise TimeoutError("launcher did not become healthy")

    def descendants(self) -> list[int]:
        """Every live process started by the launcher (same session)."""
        out = subprocess.run(["ps", "-e", "-o", "pid=,sid="], capture_output=True, text=True).stdout
        sid = self.process.pid
        return [int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for pid in self.descendants():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def launcher():
    handle = Launcher("main", "--max-concurrent-requests", "20", "--enable-prefill-logprobs")
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from shard.checkpoint.convert import default_cache_dir, default_gguf_path, ensure_converted

    return ensure_converted(default_gguf_path(), default_cache_dir(), dense=True)


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def expected_greedy(smollm2_dir, tokenizer) -> dict[str, list[int]]:
    """transformers' greedy generate() on the same converted checkpoint: the oracle."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32
    ).eval()
    out = {}
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            generated = model.generate(ids, max_new_tokens=32, do_sample=False)
            out[prompt] = generated[0, ids.shape[1] :].tolist()
    return out
