"""The launcher's children: spawn them so they die with it, wait for the shards' sockets, watch
everyone, and stop them in TGI's order (router first, so it can drain in-flight streams, then
the shards). Nothing here knows about flags or models: the CLI hands over a `LaunchPlan` of
commands, and tests hand over fake ones.

Exit codes of the launcher (`ExitCode`):

    0  stopped on request (SIGINT/SIGTERM/SIGHUP) and the router drained and exited cleanly,
       or the stop came before the router was started
    1  invalid flags, or the download/convert step (`shard prepare`) failed
    2  a shard failed to start, or crashed while serving
    3  the router exited on its own (crash, bad port, failed warmup), or exited non-zero
       when asked to stop
    4  the router was SIGKILLed during shutdown: still draining at the graceful timeout, or a
       second stop signal asked to kill everything at once

Every child runs in its own process group (a Ctrl-C in the terminal reaches only the launcher,
which then stops the children in order) and gets PR_SET_PDEATHSIG, so even a SIGKILLed
launcher leaves no orphan. All loops poll every `Timing.poll_interval` (100 ms) and read the
signal flags, so they need no threads.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from types import FrameType
from typing import Self

log = logging.getLogger("launcher")

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STDERR_FD = 2  # children's stdout goes to our stderr: logs stay out of anything piping stdout


class ExitCode(IntEnum):
    """The launcher's exit status, so a supervisor (k8s, systemd) can tell failures apart."""

    OK = 0
    ERROR = 1
    SHARD_FAILED = 2
    WEBSERVER_FAILED = 3
    SHUTDOWN_TIMEOUT = 4


class LaunchError(Exception):
    """A failure that ends the launch, with the exit code it maps to."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class StopRequested(Exception):
    """A stop signal arrived before everything was up: startup is abandoned, not failed."""


@dataclass(frozen=True)
class Command:
    """One child to spawn: its name in logs ("shard 1", "webserver"), argv and extra env."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Timing:
    """How long each wait lasts; tests shrink them, the CLI sets `graceful_timeout`."""

    graceful_timeout: float = 90.0  # router drain before SIGKILL
    shard_stop_timeout: float = 10.0  # each shard's SIGTERM -> SIGKILL delay
    poll_interval: float = 0.1
    ready_log_interval: float = 10.0


@dataclass(frozen=True)
class LaunchPlan:
    """What to run. The shard and router commands need the model directory that the prepare
    step prints, so they are functions of it."""

    prepare: Command
    shards: Callable[[str], Sequence[Command]]
    router: Callable[[str], Command]
    shard_sockets: Sequence[str]  # rank r is ready once shard_sockets[r] exists


class StopSignal:
    """SIGINT/SIGTERM/SIGHUP turned into flags that the polling loops read. The first signal
    asks for a graceful stop; any signal while already stopping forces an immediate kill.
    The handler only sets flags: logging from a signal handler can re-enter a stream write."""

    def __init__(self) -> None:
        self.requested = False
        self.stopping = False
        self.forced = False
        self.signal_name = "stop request"
        self._previous: dict[int, object] = {}

    def request(self) -> None:
        if self.requested or self.stopping:
            self.forced = True
        self.requested = True

    def begin_stopping(self) -> None:
        """From now on any signal means "kill everything now"."""
        self.stopping = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        self.request()

    def __enter__(self) -> Self:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A `preexec_fn` that asks Linux to send `sig` to the child when the launcher dies, even by
    SIGKILL. Linux ties this to the spawning *thread*, so spawn from the main thread only.
    libc is loaded here, before fork: dlopen in a forked child can deadlock."""
    parent = os.getpid()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: children may outlive a SIGKILLed launcher
        return lambda: None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)

    return preexec


def describe(returncode: int) -> str:
    """How a child ended, as in "Shard 1 crashed: exit status -9" (negative: killed by that
    signal, Popen's convention)."""
    return f"exit status {returncode}"


class Child:
    """One running child process."""

    def __init__(self, name: str, process: subprocess.Popen[bytes]) -> None:
        self.name = name
        self.process = process

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def is_running(self) -> bool:
        return self.process.poll() is None

    def terminate(self) -> None:
        if self.is_running():
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL its whole process group (helpers it spawned too), then reap it. The group is
        signalled only while the child is unreaped, so its pid cannot have been reused."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def spawn(command: Command, stdout: int = STDERR_FD) -> Child:
    """Starts a child in its own process group, dying with the launcher; stdin is closed."""
    try:
        process = subprocess.Popen(
            command.argv,
            env={**os.environ, **command.env},
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            process_group=0,
            preexec_fn=die_with_parent(),  # noqa: PLW1509 - the launcher has no other threads
        )
    except OSError as err:
        raise LaunchError(ExitCode.ERROR, f"could not start {command.name}: {err}") from err
    log.debug("started %s (pid %d): %s", command.name, process.pid, " ".join(command.argv))
    return Child(command.name, process)


def remove_stale_socket(path: str) -> None:
    """A socket left by a previous run would look like a ready shard."""
    try:
        os.unlink(path)
        log.info("removed stale socket %s", path)
    except FileNotFoundError:
        pass


class Supervisor:
    """Owns every child of the launcher. Leaving the `with` block SIGKILLs whatever is still
    running, so no exit path (exceptions included) leaks a process."""

    def __init__(self, stop: StopSignal, timing: Timing) -> None:
        self.stop = stop
        self.timing = timing
        self.shards: list[Child] = []
        self.router: Child | None = None
        self.children: list[Child] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def spawn(self, command: Command, stdout: int = STDERR_FD) -> Child:
        child = spawn(command, stdout)
        self.children.append(child)
        return child

    def prepare(self, command: Command) -> str:
        """Runs the download/convert step; the last line it prints is the model directory."""
        child = self.spawn(command, stdout=subprocess.PIPE)
        output = self._read_all(child)
        if child.returncode != 0:
            raise LaunchError(
                ExitCode.ERROR, f"download/convert failed: {describe(child.process.returncode)}"
            )
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        if not lines:
            raise LaunchError(ExitCode.ERROR, "download/convert printed no model directory")
        for line in lines[:-1]:  # anything else it printed is a log line: keep it visible
            log.info("%s: %s", command.name, line)
        log.info("model ready in %s", lines[-1])
        return lines[-1]

    def _read_all(self, child: Child) -> str:
        """The child's stdout once it exits; polls so that a stop signal is not held up."""
        while True:
            try:
                output, _ = child.process.communicate(timeout=self.timing.poll_interval)
                return output.decode(errors="replace")
            except subprocess.TimeoutExpired:
                if self.stop.requested:
                    raise StopRequested from None

    def start_shards(self, commands: Sequence[Command], sockets: Sequence[str]) -> None:
        """Spawns one shard per rank and returns once every rank's socket exists."""
        for command, socket in zip(commands, sockets, strict=True):
            remove_stale_socket(socket)
            self.shards.append(self.spawn(command))
        self._wait_ready(sockets)

    def _wait_ready(self, sockets: Sequence[str]) -> None:
        start = last_log = time.monotonic()
        pending = set(range(len(sockets)))
        while pending:
            self._check_started()
            for rank in sorted(pending):
                if os.path.exists(sockets[rank]):
                    log.info("Shard %d ready in %.1f s", rank, time.monotonic() - start)
                    pending.discard(rank)
            if self.stop.requested:
                raise StopRequested
            if pending and time.monotonic() - last_log >= self.timing.ready_log_interval:
                last_log = time.monotonic()
                for rank in sorted(pending):
                    log.info("Waiting for shard %d to be ready...", rank)
            if pending:
                time.sleep(self.timing.poll_interval)

    def _check_started(self) -> None:
        for shard in self.shards:
            if shard.returncode is not None:
                raise LaunchError(
                    ExitCode.SHARD_FAILED,
                    f"{shard.name.capitalize()} failed to "
                    f"start: {describe(shard.process.returncode)}",
                )

    def start_router(self, command: Command) -> None:
        self.router = self.spawn(command)

    def watch(self) -> ExitCode | None:
        """Polls until a child exits (returns the failure) or a stop is requested (None)."""
        serving = [*self.shards, *([self.router] if self.router else [])]
        while not self.stop.requested:
            for child in serving:
                if child.returncode is not None:
                    log.error(
                        "%s crashed: %s",
                        child.name.capitalize(),
                        describe(child.process.returncode),
                    )
                    return (
                        ExitCode.WEBSERVER_FAILED if child is self.router else ExitCode.SHARD_FAILED
                    )
            time.sleep(self.timing.poll_interval)
        log.info("Received %s: shutting down", self.stop.signal_name)
        return None

    def shutdown(self) -> ExitCode:
        """Router first (SIGTERM, drain up to the graceful timeout, SIGKILL), then every other
        child (SIGTERM, up to `shard_stop_timeout`, SIGKILL). Returns how the router ended."""
        self.stop.begin_stopping()
        code = self._stop_router()
        others = [child for child in self.children if child is not self.router]
        self._terminate(others, self.timing.shard_stop_timeout)
        return code

    def _stop_router(self) -> ExitCode:
        if self.router is None:
            return ExitCode.OK
        if self.router.is_running():
            log.info("Terminating webserver (graceful timeout %g s)", self.timing.graceful_timeout)
            if self._terminate([self.router], self.timing.graceful_timeout):
                return ExitCode.SHUTDOWN_TIMEOUT
        ok = self.router.returncode == 0
        return ExitCode.OK if ok else ExitCode.WEBSERVER_FAILED

    def _terminate(self, children: Sequence[Child], timeout: float) -> list[Child]:
        """SIGTERM, wait up to `timeout` (cut short by a second signal), then SIGKILL whatever
        is left. Returns the children that had to be killed."""
        running = [child for child in children if child.is_running()]
        for child in running:
            child.terminate()
        deadline = time.monotonic() + timeout
        while (
            any(child.is_running() for child in running)
            and time.monotonic() < deadline
            and not self.stop.forced
        ):
            time.sleep(self.timing.poll_interval)
        killed = [child for child in running if child.is_running()]
        for child in killed:
            reason = "second signal" if self.stop.forced else f"no exit after {timeout:g} s"
            log.warning("Killing %s (%s)", child.name, reason)
            child.kill()
        for child in running:
            log.info(
                "%s terminated: %s", child.name.capitalize(), describe(child.process.returncode)
            )
        return killed

    def close(self) -> None:
        for child in self.children:
            child.kill()


def launch(plan: LaunchPlan, stop: StopSignal, timing: Timing) -> ExitCode:
    """Prepare -> shards -> router -> watch, then the ordered shutdown, whatever happened."""
    with Supervisor(stop, timing) as supervisor:
        failure = _start_and_watch(supervisor, plan)
        stopped = supervisor.shutdown()
        return failure if failure is not None else stopped


def _start_and_watch(supervisor: Supervisor, plan: LaunchPlan) -> ExitCode | None:
    try:
        model_dir = supervisor.prepare(plan.prepare)
        supervisor.start_shards(plan.shards(model_dir), plan.shard_sockets)
        supervisor.start_router(plan.router(model_dir))
        return supervisor.watch()
    except StopRequested:
        log.info("Received %s during startup: shutting down", supervisor.stop.signal_name)
        return None
    except LaunchError as err:
        log.error("%s", err)
        return err.code
