"""Supervision tests with fake children: tiny Python scripts stand in for `shard prepare`,
`shard serve` and the router. They record their pid, argv and the signals they get in a
directory, so the tests can check the stop order and that no process is left behind.

Two levels: `processes.launch` called in-process with fake commands (fast, precise), and the
real `python -m launcher` run as a subprocess, in a directory whose fake `shard` and `router`
packages shadow the real ones, so real signals hit the real CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from launcher.cli import app
from launcher.processes import (
    Command,
    ExitCode,
    LaunchPlan,
    StopSignal,
    Timing,
    launch,
)

REPO = Path(__file__).resolve().parents[2]
FAST = Timing(
    graceful_timeout=2.0, shard_stop_timeout=2.0, poll_interval=0.02, ready_log_interval=0.2
)

FAKE_CHILD = textwrap.dedent('''
    """A fake shard/router: behaviour from FAKE_* env vars, traces in $FAKE_DIR."""
    import argparse, json, os, signal, sys, time

    DIR = os.environ["FAKE_DIR"]

    def note(event):
        with open(os.path.join(DIR, "events"), "a") as f:
            f.write(event + "\\n")

    def record(name, argv):
        env = {k: os.environ.get(k) for k in
               ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOG_LEVEL")}
        with open(os.path.join(DIR, name + ".json"), "w") as f:
            json.dump({"argv": argv, "env": env}, f)
        with open(os.path.join(DIR, name + ".pid"), "w") as f:
            f.write(str(os.getpid()))

    def is_me(var, rank):
        return os.environ.get(var) == str(rank)

    def prepare(argv):
        record("prepare", argv)
        if os.environ.get("FAKE_PREPARE_FAIL"):
            print("half-converted", flush=True)
            sys.exit(5)
        time.sleep(float(os.environ.get("FAKE_PREPARE_DELAY", "0")))
        print("a log line on stdout")
        print(os.path.join(DIR, "model"), flush=True)

    def serve(argv):
        parser = argparse.ArgumentParser()
        parser.add_argument("--uds-path")
        parser.add_argument("--rank", type=int)
        args, _ = parser.parse_known_args(argv)
        name, socket = f"shard{args.rank}", f"{args.uds_path}-{args.rank}"
        record(name, argv)
        note(f"{name} start stale={os.path.exists(socket)}")

        def on_term(*_):
            note(f"{name} term")
            sys.exit(0)

        signal.signal(signal.SIGTERM, on_term)
        if is_me("FAKE_SHARD_START_FAIL", args.rank):
            time.sleep(0.2)
            sys.exit(3)
        if is_me("FAKE_SHARD_SLOW", args.rank):
            time.sleep(60)
        open(socket, "w").close()
        if is_me("FAKE_SHARD_CRASH", args.rank):
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGKILL)
        while True:
            time.sleep(1)

    def router(argv):
        record("router", argv)

        def on_term(*_):
            note("router term")
            if os.environ.get("FAKE_ROUTER_IGNORE_TERM"):
                return
            time.sleep(float(os.environ.get("FAKE_ROUTER_DRAIN", "0")))
            note("router exit")
            sys.exit(0)

        signal.signal(signal.SIGTERM, on_term)
        if os.environ.get("FAKE_ROUTER_EXIT"):
            time.sleep(0.3)
            sys.exit(int(os.environ["FAKE_ROUTER_EXIT"]))
        while True:
            time.sleep(1)

    def main(role, argv):
        {"prepare": prepare, "serve": serve, "router": router}[role](argv)
''')


@pytest.fixture
def fake_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory holding fake_child.py plus `shard` and `router` packages that run it."""
    (tmp_path / "fake_child.py").write_text(FAKE_CHILD)
    for package, call in (
        ("shard", "main(sys.argv[1], sys.argv[2:])"),
        ("router", 'main("router", sys.argv[1:])'),
    ):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "__main__.py").write_text(
            f"import sys\nfrom fake_child import main\n{call}\n"
        )
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    return tmp_path


def is_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (zombies still answer kill 0)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def recorded_pids(directory: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in directory.glob("*.pid")}


def assert_no_survivors(directory: Path, timeout: float = 3.0) -> None:
    pids = recorded_pids(directory)
    deadline = time.monotonic() + timeout
    while any(is_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [name for name, pid in pids.items() if is_alive(pid)]


def events(directory: Path) -> list[str]:
    path = directory / "events"
    return path.read_text().splitlines() if path.exists() else []


def assert_router_stopped_before_shards(directory: Path) -> None:
    seen = events(directory)
    router_done = max(i for i, e in enumerate(seen) if e.startswith("router"))
    shard_terms = [i for i, e in enumerate(seen) if e.startswith("shard") and e.endswith("term")]
    assert "router term" in seen and shard_terms, seen
    assert router_done < min(shard_terms), seen


def wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


# ----------------------------------------------------------------------------- in-process


def fake_command(directory: Path, name: str, role: str, *args: str) -> Command:
    code = (
        f"import sys; sys.path.insert(0, {str(directory)!r}); import fake_child; "
        f"fake_child.main({role!r}, sys.argv[1:])"
    )
    return Command(name, (sys.executable, "-c", code, *args))


def fake_plan(directory: Path, num_shard: int = 2) -> LaunchPlan:
    sock = str(directory / "sock")
    return LaunchPlan(
        prepare=fake_command(directory, "download", "prepare"),
        shards=lambda model_dir: [
            fake_command(
                directory,
                f"shard {rank}",
                "serve",
                "--uds-path",
                sock,
                "--rank",
                str(rank),
                "--model-id",
                model_dir,
            )
            for rank in range(num_shard)
        ],
        router=lambda model_dir: fake_command(
            directory, "webserver", "router", "--tokenizer-name", model_dir
        ),
        shard_sockets=[f"{sock}-{rank}" for rank in range(num_shard)],
    )


def run_launch(
    directory: Path,
    stop: StopSignal | None = None,
    timing: Timing = FAST,
    plan: LaunchPlan | None = None,
) -> tuple[ExitCode, float]:
    start = time.monotonic()
    code = launch(plan or fake_plan(directory), stop or StopSignal(), timing)
    return code, time.monotonic() - start


def stop_when(path: Path, stop: StopSignal, times: int = 1, delay: float = 0.0) -> None:
    """Requests a stop (`times` times, `delay` apart) once `path` exists, from a thread."""

    def request() -> None:
        wait_for(path)
        for _ in range(times):
            time.sleep(delay)
            stop.request()

    threading.Thread(target=request, daemon=True).start()


def test_stop_request_stops_router_first_then_shards_and_exits_0(fake_dir: Path) -> None:
    stop = StopSignal()
    stop_when(fake_dir / "router.pid", stop)
    code, _ = run_launch(fake_dir, stop)
    assert code == ExitCode.OK
    assert_router_stopped_before_shards(fake_dir)
    assert {"shard0 term", "shard1 term", "router exit"} <= set(events(fake_dir))
    assert_no_survivors(fake_dir)


def test_prepare_output_last_line_is_the_model_dir(fake_dir: Path) -> None:
    stop = StopSignal()
    stop_when(fake_dir / "router.pid", stop)
    run_launch(fake_dir, stop)
    model_dir = str(fake_dir / "model")
    router = json.loads((fake_dir / "router.json").read_text())
    shard = json.loads((fake_dir / "shard1.json").read_text())
    assert router["argv"] == ["--tokenizer-name", model_dir]
    assert shard["argv"][-2:] == ["--model-id", model_dir]


def test_shard_crash_stops_everything_and_names_the_shard(
    fake_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FAKE_SHARD_CRASH", "1")
    with caplog.at_level(logging.INFO, logger="launcher"):
        code, _ = run_launch(fake_dir)
    assert code == ExitCode.SHARD_FAILED
    assert "Shard 1 crashed: exit status -9" in caplog.text
    assert "shard0 term" in events(fake_dir) and "router term" in events(fake_dir)
    assert_router_stopped_before_shards(fake_dir)
    assert_no_survivors(fake_dir)


def test_shard_dying_during_startup_stops_the_others(
    fake_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FAKE_SHARD_START_FAIL", "1")
    code, _ = run_launch(fake_dir)
    assert code == ExitCode.SHARD_FAILED
    assert "Shard 1 failed to start: exit status 3" in caplog.text
    assert not (fake_dir / "router.pid").exists()
    assert "shard0 term" in events(fake_dir)
    assert_no_survivors(fake_dir)


def test_stale_sockets_are_removed_before_the_shards_start(
    fake_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for rank in range(2):
        (fake_dir / f"sock-{rank}").write_text("")
    monkeypatch.setenv("FAKE_SHARD_START_FAIL", "1")  # so the launch ends on its own
    run_launch(fake_dir)
    assert "shard0 start stale=False" in events(fake_dir)
    assert "shard1 start stale=False" in events(fake_dir)


def test_waiting_for_a_slow_shard_is_logged_and_a_stop_ends_the_wait(
    fake_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FAKE_SHARD_SLOW", "1")
    stop = StopSignal()
    threading.Timer(0.8, stop.request).start()
    with caplog.at_level(logging.INFO, logger="launcher"):
        code, elapsed = run_launch(fake_dir, stop)
    assert code == ExitCode.OK  # a stop during startup is not a failure
    assert "Waiting for shard 1 to be ready..." in caplog.text
    assert "Waiting for shard 0 to be ready..." not in caplog.text
    assert not (fake_dir / "router.pid").exists()
    assert elapsed < 5
    assert_no_survivors(fake_dir)


def test_router_crash_stops_the_shards(
    fake_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FAKE_ROUTER_EXIT", "3")
    code, _ = run_launch(fake_dir)
    assert code == ExitCode.WEBSERVER_FAILED
    assert "Webserver crashed: exit status 3" in caplog.text
    assert {"shard0 term", "shard1 term"} <= set(events(fake_dir))
    assert_no_survivors(fake_dir)


def test_router_ignoring_sigterm_is_killed_after_the_graceful_timeout(
    fake_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ROUTER_IGNORE_TERM", "1")
    stop = StopSignal()
    stop_when(fake_dir / "router.pid", stop)
    timing = Timing(graceful_timeout=1.0, shard_stop_timeout=2.0, poll_interval=0.02)
    code, elapsed = run_launch(fake_dir, stop, timing)
    assert code == ExitCode.SHUTDOWN_TIMEOUT
    assert 1.0 <= elapsed < 5
    assert "router term" in events(fake_dir) and "router exit" not in events(fake_dir)
    assert_router_stopped_before_shards(fake_dir)
    assert_no_survivors(fake_dir)


def test_second_stop_during_the_drain_kills_everything_at_once(
    fake_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ROUTER_DRAIN", "30")
    stop = StopSignal()
    stop_when(fake_dir / "router.pid", stop, times=2, delay=0.3)
    timing = Timing(graceful_timeout=60, shard_stop_timeout=60, poll_interval=0.02)
    code, elapsed = run_launch(fake_dir, stop, timing)
    assert code == ExitCode.SHUTDOWN_TIMEOUT
    assert elapsed < 5
    assert_no_survivors(fake_dir)


def test_failed_prepare_starts_no_shard(
    fake_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FAKE_PREPARE_FAIL", "1")
    code, _ = run_launch(fake_dir)
    assert code == ExitCode.ERROR
    assert "download/convert failed: exit status 5" in caplog.text
    assert set(recorded_pids(fake_dir)) == {"prepare"}


def test_stop_during_prepare_stops_it(fake_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_PREPARE_DELAY", "30")
    stop = StopSignal()
    stop_when(fake_dir / "prepare.pid", stop)
    code, elapsed = run_launch(fake_dir, stop)
    assert code == ExitCode.OK and elapsed < 5
    assert set(recorded_pids(fake_dir)) == {"prepare"}
    assert_no_survivors(fake_dir)


def test_unstartable_command_is_an_error(fake_dir: Path) -> None:
    plan = fake_plan(fake_dir)
    plan = LaunchPlan(
        Command("download", (str(fake_dir / "missing"),)),
        plan.shards,
        plan.router,
        plan.shard_sockets,
    )
    assert run_launch(fake_dir, plan=plan)[0] == ExitCode.ERROR


def test_stop_signal_first_requests_then_forces_and_restores_handlers() -> None:
    before = signal.getsignal(signal.SIGHUP)
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.01)  # the handler runs between bytecodes of this thread
        assert stop.requested and not stop.forced and stop.signal_name == "SIGHUP"
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.01)
        assert stop.forced
    assert signal.getsignal(signal.SIGHUP) is before


def test_signal_while_stopping_after_a_crash_forces() -> None:
    stop = StopSignal()
    stop.begin_stopping()
    stop.request()
    assert stop.forced


def test_children_die_with_a_sigkilled_parent(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: the parent here is a throwaway process, so it can be SIGKILLed."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(REPO)!r})
            from launcher.processes import Command, spawn
            child = spawn(Command("sleeper", (sys.executable, "-c", "import time; time.sleep(60)")))
            print(child.pid, flush=True)
            time.sleep(60)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    child_pid = int(parent.stdout.readline())
    assert is_alive(child_pid)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 3
    while is_alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_alive(child_pid)


# --------------------------------------------------------- the real launcher, real signals


def launcher_env(directory: Path, **fake: str) -> dict[str, str]:
    """Our environment minus anything a launcher flag would read, plus the fake's knobs."""
    flag_vars = {p.envvar for p in app.params if isinstance(p.envvar, str)}
    env = {k: v for k, v in os.environ.items() if k not in flag_vars | {"LOG_LEVEL"}}
    return {**env, "PYTHONPATH": str(REPO), "FAKE_DIR": str(directory), **fake}


def start_launcher(directory: Path, *args: str, **fake: str) -> subprocess.Popen[str]:
    """`python -m launcher` with cwd = the fake dir, so its children import the fakes."""
    argv = [
        sys.executable,
        "-m",
        "launcher",
        "--shard-uds-path",
        str(directory / "sock"),
        "--num-shard",
        "2",
        *args,
    ]
    return subprocess.Popen(
        argv,
        cwd=directory,
        env=launcher_env(directory, **fake),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(launcher: subprocess.Popen[str], timeout: float = 15) -> tuple[int, str]:
    try:
        _, stderr = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher.kill()
        raise
    return launcher.returncode, stderr


def signal_when_up(
    directory: Path, launcher: subprocess.Popen[str], *signals: signal.Signals
) -> None:
    wait_for(directory / "router.pid")
    for sig in signals:
        launcher.send_signal(sig)
        time.sleep(0.3)


def test_launcher_sigterm_exits_0_after_an_ordered_stop(fake_dir: Path) -> None:
    launcher = start_launcher(fake_dir, "--port", "3111", "--dtype", "bfloat16")
    signal_when_up(fake_dir, launcher, signal.SIGTERM)
    code, stderr = finish(launcher)
    assert code == 0, stderr
    assert_router_stopped_before_shards(fake_dir)
    assert_no_survivors(fake_dir)
    model_dir, sock = str(fake_dir / "model"), str(fake_dir / "sock")
    router = json.loads((fake_dir / "router.json").read_text())["argv"]
    assert router[router.index("--tokenizer-name") + 1] == model_dir
    assert router[router.index("--master-shard-uds-path") + 1] == f"{sock}-0"
    assert router[router.index("--port") + 1] == "3111"
    shard = json.loads((fake_dir / "shard1.json").read_text())
    assert shard["argv"][:2] == ["--model-id", model_dir]  # after `serve`
    assert shard["argv"][shard["argv"].index("--dtype") + 1] == "bfloat16"
    assert shard["env"] == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "localhost",
        "MASTER_PORT": "29500",
        "LOG_LEVEL": "info",
    }


def test_launcher_exits_2_when_a_shard_is_killed(fake_dir: Path) -> None:
    launcher = start_launcher(fake_dir)
    wait_for(fake_dir / "router.pid")
    os.kill(recorded_pids(fake_dir)["shard1"], signal.SIGKILL)
    code, stderr = finish(launcher)
    assert code == ExitCode.SHARD_FAILED
    assert "Shard 1 crashed: exit status -9" in stderr
    assert_router_stopped_before_shards(fake_dir)
    assert_no_survivors(fake_dir)


def test_launcher_kills_a_router_that_ignores_sigterm_after_g_seconds(fake_dir: Path) -> None:
    launcher = start_launcher(fake_dir, "-g", "1", FAKE_ROUTER_IGNORE_TERM="1")
    signal_when_up(fake_dir, launcher, signal.SIGTERM)
    code, stderr = finish(launcher)
    assert code == ExitCode.SHUTDOWN_TIMEOUT, stderr
    assert "Killing webserver" in stderr
    assert_router_stopped_before_shards(fake_dir)
    assert_no_survivors(fake_dir)


def test_launcher_second_sigint_kills_at_once(fake_dir: Path) -> None:
    launcher = start_launcher(fake_dir, FAKE_ROUTER_DRAIN="30")
    start = time.monotonic()
    signal_when_up(fake_dir, launcher, signal.SIGINT, signal.SIGINT)
    code, stderr = finish(launcher)
    assert code == ExitCode.SHUTDOWN_TIMEOUT, stderr
    assert time.monotonic() - start < 8
    assert_no_survivors(fake_dir)


def test_sigkilled_launcher_leaves_no_orphans(fake_dir: Path) -> None:
    launcher = start_launcher(fake_dir)
    wait_for(fake_dir / "router.pid")
    launcher.kill()
    finish(launcher)
    assert_no_survivors(fake_dir, timeout=5)


@pytest.mark.parametrize(
    ("fake", "code", "message"),
    [
        ({"FAKE_PREPARE_FAIL": "1"}, ExitCode.ERROR, "download/convert failed: exit status 5"),
        (
            {"FAKE_SHARD_START_FAIL": "0"},
            ExitCode.SHARD_FAILED,
            "Shard 0 failed to start: exit status 3",
        ),
        ({"FAKE_ROUTER_EXIT": "3"}, ExitCode.WEBSERVER_FAILED, "Webserver crashed: exit status 3"),
    ],
)
def test_launcher_failures_exit_with_their_code(
    fake_dir: Path, fake: dict[str, str], code: ExitCode, message: str
) -> None:
    returncode, stderr = finish(start_launcher(fake_dir, **fake))
    assert returncode == code, stderr
    assert message in stderr
    assert_no_survivors(fake_dir)


def test_launcher_json_output_logs_json_lines(fake_dir: Path) -> None:
    returncode, stderr = finish(start_launcher(fake_dir, "--json-output", FAKE_PREPARE_FAIL="1"))
    launcher_lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(
        entry["message"].startswith("download/convert failed") and entry["level"] == "ERROR"
        for entry in launcher_lines
    )
    assert returncode == ExitCode.ERROR
