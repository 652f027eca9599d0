"""Batch-invariant mode's CUDA kernels (shard/layers/triton_invariant.py and the Triton
attention backend taking every step) run by Triton's interpreter on the CPU: products and
RMSNorm against their references and a row alone against the same row among others; prompt
tokens attended one at a time, against the dense reference and, bit for bit, against decode
tokens at the same positions. As in test_triton_decode, the kernels run in a child process
that sets TRITON_INTERPRET first; the interpreter has no bfloat16, which the device check
covers."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from shard.engine.forward_context import AttentionMetadata
from tests.shard.test_attention import CASES, dense_reference, make_case, run

REPO = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16]


def check_kernels() -> str:
    """In the child: every check; returns what ran."""
    from shard.attention.triton_decode import TritonPagedAttention
    from shard.layers import triton_invariant
    from shard.layers.layernorm import rms_norm

    torch.manual_seed(0)
    for dtype in DTYPES:
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        weight, x = torch.randn(83, 100).to(dtype), torch.randn(70, 100).to(dtype)
        full = triton_invariant.matmul(x, weight)
        torch.testing.assert_close(
            full.float(), x.float() @ weight.float().t(), rtol=tol, atol=tol * 10
        )
        for n in (1, 5, 33, 64):
            assert torch.equal(triton_invariant.matmul(x[:n], weight), full[:n]), n
        norm = torch.randn(100).to(dtype)
        normed = triton_invariant.rms_norm(x, norm, 1e-5)
        torch.testing.assert_close(
            normed.float(), rms_norm(x, norm, 1e-5).float(), rtol=tol, atol=tol
        )
        assert torch.equal(triton_invariant.rms_norm(x[:7], norm, 1e-5), normed[:7])
        for case_name in ("prefill", "mixed", "chunked"):
            case = make_case(*CASES[case_name], 8, 2, 16, dtype)
            out = run(TritonPagedAttention(), case)
            torch.testing.assert_close(out.double(), dense_reference(case), atol=tol, rtol=tol)
        # a prompt chunk's token 5 (position 19), then its query as a decode step there
        case = make_case([6], [20], 8, 2, 16, dtype)
        chunk = run(TritonPagedAttention(), case)
        table = case.meta.block_tables[0].tolist()
        meta = AttentionMetadata.build([1], [20], [table], [0], 16)
        alone = run(TritonPagedAttention(), replace(case, q=case.q[5:6].clone(), meta=meta))
        assert torch.equal(alone[0], chunk[5])
    return "kernels checked"


def test_invariant_kernels_interpreted():
    pytest.importorskip("triton")
    code = "from tests.shard.test_triton_invariant import check_kernels\nprint(check_kernels())\n"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernels checked" in done.stdout
