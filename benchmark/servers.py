"""The servers a benchmark run starts, each a process on its own port, stopped afterwards."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ServerSpec:
    name: str  # the table's row label
    dialect: str  # how the load generator talks to it (benchmark/loadgen.py)
    argv: tuple[str, ...]  # {port} is replaced by the port


def ours(args: str) -> ServerSpec:
    """This server through its launcher, with extra launcher flags (e.g. "--dtype bfloat16")."""
    name = f"ours {args}".strip() if args else "ours (defaults)"
    uds = f"/tmp/textgen-bench-{os.getpid()}-{abs(hash(args)) % 10_000}"
    argv = (
        sys.executable,
        "-m",
        "launcher",
        "--hostname",
        "127.0.0.1",
        "--port",
        "{port}",
        "--shard-uds-path",
        uds,
        "--master-port",
        str(free_port()),
        *shlex.split(args),
    )
    return ServerSpec(name, "tgi", argv)


def naive(model_dir: str, dtype: str) -> ServerSpec:
    argv = (
        sys.executable,
        "-m",
        "benchmark.naive_server",
        "--model-dir",
        model_dir,
        "--port",
        "{port}",
        "--dtype",
        dtype,
    )
    return ServerSpec(f"transformers, one at a time ({dtype})", "tgi", argv)


def llama_server(binary: str, gguf: str, slots: int, context: int) -> ServerSpec:
    argv = (
        binary,
        "-m",
        gguf,
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "-t",
        "2",
        "-np",
        str(slots),
        "-c",
        str(context),
    )
    return ServerSpec("llama.cpp llama-server (2 threads)", "llama", argv)


def group_rss_mib(pgid: int) -> float:
    """Resident memory of every process in the process group (launcher, router, shards: all
    of a server), in MiB, from /proc."""
    total_kib = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            status = (entry / "status").read_text()
        except (OSError, ProcessLookupError):
            continue  # exited meanwhile
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total_kib += int(line.split()[1])
    return total_kib / 1024


class MemorySampler:
    """The process group's resident memory every 0.1 s: its peak and its latest value."""

    def __init__(self, pgid: int):
        self.pgid, self.peak_mib, self.last_mib = pgid, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.last_mib = group_rss_mib(self.pgid)
            self.peak_mib = max(self.peak_mib, self.last_mib)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Running:
    """A started server: `url`, and `stop()` (SIGTERM to its process group, then SIGKILL).
    `startup_s`: until /health answered; `memory`: its resident memory as it runs;
    `loaded_mib`: the memory once healthy, `loading_peak_mib`: the peak until then."""

    def __init__(self, spec: ServerSpec, log_dir: Path, startup_timeout: float = 600.0):
        self.spec = spec
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [a.replace("{port}", str(self.port)) for a in spec.argv]
        log_name = "".join(c if c.isalnum() else "_" for c in spec.name)
        self.log = open(log_dir / f"{log_name}.log", "w")
        started = time.monotonic()
        self.process = subprocess.Popen(
            argv, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.memory = MemorySampler(self.process.pid)
        self._wait_healthy(startup_timeout)
        self.startup_s = time.monotonic() - started
        self.loading_peak_mib = self.memory.peak_mib
        self.loaded_mib = group_rss_mib(self.process.pid)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited during start-up (see {self.log.name})")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{self.spec.name} did not become healthy in {timeout:.0f} s")

    def stop(self) -> None:
        self.memory.stop()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()
