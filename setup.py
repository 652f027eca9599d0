"""The build's one step beyond pyproject.toml: the gRPC stubs (`pb/`, never committed) are
generated from proto/generate.proto before setuptools looks for packages, so that `pip install
.` and a wheel built from a clean clone hold the `pb` package, as `make proto` does for a
checkout. grpcio-tools is a build requirement (pyproject.toml's [build-system])."""

import os
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


generate_stubs()
setup()
