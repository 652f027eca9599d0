"""The build's two steps beyond pyproject.toml, before setuptools looks for packages:

- the gRPC stubs (`pb/`, never committed) are generated from proto/generate.proto, so that `pip
  install .` and a wheel built from a clean clone hold the `pb` package, as `make proto` does
  for a checkout (grpcio-tools is a build requirement: pyproject.toml's [build-system]);
- the shard's C kernels are compiled, one library per instruction-set variant, into
  shard/_kernels/ (shard/native_build.py), so that serving needs no compiler. Without one the
  install still succeeds, and the shard says at start-up what it does instead.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def generate_stubs() -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).with_name("_proto")  # google/protobuf/*.proto
    (ROOT / "pb").mkdir(exist_ok=True)
    args = [
        "grpc_tools.protoc", "-Ipb=proto", f"-I{well_known}", "--python_out=.",
        "--grpc_python_out=.", "--pyi_out=.", "proto/generate.proto",
    ]  # fmt: skip
    cwd = Path.cwd()
    try:
        os.chdir(ROOT)  # the stubs' import paths (`pb.generate_pb2`) follow -Ipb=proto
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on proto/generate.proto")
    finally:
        os.chdir(cwd)
    (ROOT / "pb" / "__init__.py").touch()


def build_kernels() -> None:
    spec = importlib.util.spec_from_file_location(
        "native_build", ROOT / "shard" / "native_build.py"
    )
    native_build = importlib.util.module_from_spec(spec)
    sys.modules["native_build"] = native_build  # dataclasses look their module up
    spec.loader.exec_module(native_build)
    try:
        native_build.build_all(ROOT / "shard" / "_kernels")
    except RuntimeError as err:
        print(f"warning: the C kernels were not built ({err})", file=sys.stderr)


generate_stubs()
build_kernels()
setup()
