"""What `pip install .` gives a user, checked from a clean copy of the repository (the tracked
files only: no generated gRPC stubs): a wheel that holds the `pb` stubs and the C kernels'
sources, and the launcher under its own name and TGI's, working from a fresh environment."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [
    "launcher",
    "text-generation-launcher",
    "text-generation-router",
    "text-generation-server",
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel built from a clean copy; the dependencies come from this
    environment through a .pth file (the wheel itself goes in without them)."""
    tmp = tmp_path_factory.mktemp("packaging")
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    clean = tmp / "clean"
    for name in filter(None, tracked):
        source = ROOT / name.decode()
        if source.is_file():  # a tracked file deleted in the working tree is not copied
            target = clean / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    assert not (clean / "pb").exists()
    pip = [sys.executable, "-m", "pip"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist")]
    subprocess.run([*build, str(clean)], check=True)
    (wheel,) = (tmp / "dist").glob("*.whl")
    env = tmp / "env"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True)  # fmt: skip
    fresh = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(fresh, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env


def test_the_wheel_holds_the_stubs_and_the_kernels(installed):
    python = installed / "bin" / "python"
    code = (
        "import pb.generate_pb2, launcher, shard.quant.kernels as k, shard.native as n;"
        "print(pb.generate_pb2.__file__); print(launcher.__file__);"
        "print(k.SOURCE.is_file() and n.SIMD_HEADER.is_file())"
    )
    out = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, check=True, cwd=installed
    ).stdout.split()
    assert all(path.startswith(str(installed)) for path in out[:2]), out  # not the checkout
    assert out[2] == "True"


@pytest.mark.parametrize("command", COMMANDS)
def test_commands_are_on_the_path(installed, command):
    done = subprocess.run(
        [str(installed / "bin" / command), "--help"], capture_output=True, text=True,
        cwd=installed,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    if "launcher" in command:
        assert "--model-id" in done.stdout and "--disable-grammar-support" in done.stdout
