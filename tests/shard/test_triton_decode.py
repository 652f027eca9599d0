"""The Triton paged decode kernel against the dense reference, run by Triton's interpreter on
the CPU, so its indexing, masking and online softmax are checked here; the device check runs it
compiled on a GPU. The cases are test_attention's.

Triton reads TRITON_INTERPRET when it is imported (its own library functions are built then),
so the kernel runs in a child process that sets it first. float32 and float16 are checked;
the interpreter cannot load or store bfloat16 (numpy has no such type), so bfloat16 is left to
the device check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shard.attention import triton_decode
from shard.attention.triton_decode import TritonPagedAttention
from tests.shard.test_attention import CASES, HEADS, assert_close, dense_reference, make_case, run

REPO = Path(__file__).resolve().parents[2]
DECODES = ["decode", "decode_uniform"]
DTYPES = [torch.float32, torch.float16]


def check_every_decode_case() -> int:
    """In the child: every decode case, block size and head layout; returns the kernel calls."""
    calls = []
    real = triton_decode.paged_decode

    def counted(*args):
        calls.append(1)
        return real(*args)

    triton_decode.paged_decode = counted
    for dtype in DTYPES:
        for case_name in DECODES:
            for heads in HEADS:
                for block_size in (16, 32):
                    case = make_case(*CASES[case_name], *heads, block_size, dtype)
                    out = run(TritonPagedAttention(), case)
                    assert out.dtype == dtype
                    tol = 1e-5 if dtype == torch.float32 else 2e-3
                    torch.testing.assert_close(
                        out.double(), dense_reference(case), atol=tol, rtol=tol
                    )
    return len(calls)


def test_decode_kernel_matches_dense_reference_interpreted():
    pytest.importorskip("triton")
    code = (
        "from tests.shard.test_triton_decode import check_every_decode_case\n"
        "print('kernel calls', check_every_decode_case())\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"kernel calls {len(DTYPES) * len(DECODES) * len(HEADS) * 2}" in done.stdout


@pytest.mark.parametrize("case_name", ["prefill", "mixed", "chunked"])
def test_prompts_go_through_sdpa(case_name, monkeypatch):
    monkeypatch.setattr(triton_decode, "paged_decode", None)  # never called for prompts
    case = make_case(*CASES[case_name], 9, 3, 16, torch.float32)
    assert_close(run(TritonPagedAttention(), case), case, torch.float32)


def test_decode_steps_it_cannot_take_fall_back_to_sdpa(monkeypatch):
    monkeypatch.setattr(triton_decode, "paged_decode", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    case = make_case(*CASES["decode"], 8, 2, 4, torch.float32)  # pages below 16 keys
    assert_close(run(TritonPagedAttention(), case), case, torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET")  # CPU tensors without the interpreter
    case = make_case(*CASES["decode"], 8, 2, 16, torch.float32)
    assert_close(run(TritonPagedAttention(), case), case, torch.float32)
