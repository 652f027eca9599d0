"""The gRPC stubs in pb/ are generated from proto/generate.proto and must match it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Ipb=proto",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            "proto/generate.proto",
        ],
        cwd=ROOT,
        check=True,
    )
    for name in ("generate_pb2.py", "generate_pb2_grpc.py", "generate_pb2.pyi"):
        fresh = (tmp_path / "pb" / name).read_text()
        current = (ROOT / "pb" / name).read_text()
        assert fresh == current, f"pb/{name} is stale: run `make proto`"


def test_request_carries_token_ids():
    from pb import generate_pb2

    request = generate_pb2.Request(id=1, input_ids=[1, 2, 3], blocks=[1], slots=[16, 17, 18])
    assert list(request.input_ids) == [1, 2, 3]
    assert generate_pb2.DESCRIPTOR.package == "generate.v3"
