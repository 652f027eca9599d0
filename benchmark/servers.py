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


def ours(args: str, kv_args: str = "") -> ServerSpec:
    """This server through its launcher, with extra launcher flags (e.g. "--dtype bfloat16"),
    named by them; kv_args (the KV cache sized as llama-server's) go after them unnamed."""
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
        *shlex.split(kv_args),
    )
    return ServerSpec(name, "tgi", argv)


def llama_kv_args(args: str, context: int) -> str:
    """The launcher flags that give ours llama-server's KV cache: `-c` tokens in float16 (its
    default f16 cache), each unless `args` sets it already."""
    extra = []
    if "--max-batch-total-tokens" not in args and "--kv-cache-memory" not in args:
        extra += ["--max-batch-total-tokens", str(context)]
    if "--kv-cache-dtype" not in args:
        extra += ["--kv-cache-dtype", "float16"]
    return shlex.join(extra)


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


def tree_rss_mib(root: int) -> float:
    """Resident memory of a process and all its descendants (launcher, router, shards: all of
    a server, whatever sessions they start), in MiB, from /proc."""
    parents, rss = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue  # exited meanwhile
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        rss[int(entry.name)] = next(
            (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0
        )
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(rss.get(p, 0) for p in tree) / 1024


class MemorySampler:
    """The server's resident memory (tree_rss_mib) every 0.1 s: its peak and latest value."""

    def __init__(self, root: int):
        self.root, self.peak_mib, self.last_mib = root, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.last_mib = tree_rss_mib(self.root)
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
        self.loaded_mib = tree_rss_mib(self.process.pid)

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
