"""The kernel table of docs/quantization.md: each quantized product on the shapes of a 1B and an
8B Llama 3 at 1, 4, 16 and 64 rows, ours beside the int4/int8 products the pinned torch ships
and beside llama.cpp's own (ggml_mul_mat, through scripts/ggml_matmul_bench.c built against the
libggml of ../shared/tools/build-llama-server.sh; skipped where that is absent).

    python scripts/kernel_table.py [--rows 1,4,16,64] [--repeats 15] [--llama-cpp DIR]

Every product reads its weights from memory, as a decode step does: each kernel cycles through
enough copies of its matrix to exceed the last-level cache. Times are medians in ms, on 2
threads; GB/s is the weights' bytes over that time.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import typer
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shard.quant.ggml import BlockMatrix  # noqa: E402
from shard.quant.kernels import get_kernels  # noqa: E402
from shard.quant.weight import quantize  # noqa: E402

# (model, matrix, K, N): the largest products of each layer
SHAPES = [
    ("1B", "gate|up", 2048, 16384),
    ("1B", "down", 8192, 2048),
    ("8B", "gate|up", 4096, 28672),
    ("8B", "down", 14336, 4096),
]
MEMORY_BYTES = 256 << 20  # what each kernel cycles through
HALF_FIELDS = {"Q4_K": (0, 2), "Q6_K": (208,)}  # where each block keeps its float16 factors
GGML_NAMES = {"Q4_K": "q4_K", "Q6_K": "q6_K", "q8 (Q8_0)": "q8_0", "q4 (Q4_1)": "q4_1"}


@dataclass
class Kernel:
    name: str
    nbytes: int  # of one copy of the weights
    run: Callable[[int, torch.Tensor], object]  # (copy index, x [rows, K]) -> x W^T


def random_blocks(ggml_type: GGMLQuantizationType, n: int, k: int, rng) -> BlockMatrix:
    """Random block bytes with finite, small float16 factors (speed does not depend on them)."""
    weights, nbytes = GGML_QUANT_SIZES[ggml_type]
    raw = rng.integers(0, 256, size=(n, k // weights, nbytes), dtype=np.uint8)
    for at in HALF_FIELDS[ggml_type.name]:
        halves = rng.uniform(-0.02, 0.02, size=(n, k // weights)).astype(np.float16)
        raw[..., at : at + 2] = halves.view(np.uint8).reshape(n, k // weights, 2)
    return BlockMatrix(ggml_type, torch.from_numpy(raw.reshape(n, -1)), k)


def copies_of(make: Callable[[], object], nbytes: int) -> list:
    return [make() for _ in range(MEMORY_BYTES // nbytes + 1)]


def product(kernels, weights: list) -> Callable[[int, torch.Tensor], torch.Tensor]:
    return lambda i, x: kernels.matmul(x, weights[i])


def our_kernels(k: int, n: int) -> list[Kernel]:
    kernels, rng = get_kernels(), np.random.default_rng(0)
    out = []
    for name in ("Q4_K", "Q6_K"):
        ggml_type = GGMLQuantizationType[name]
        first = random_blocks(ggml_type, n, k, rng)
        ws = copies_of(lambda t=ggml_type: random_blocks(t, n, k, rng), first.nbytes())
        out.append(Kernel(f"ours {name}", first.nbytes(), product(kernels, ws)))
    dense = torch.randn(n, k) * 0.02
    for name, kind in (("q4 (Q4_1)", "q4"), ("q8 (Q8_0)", "q8")):
        first = quantize(dense, kind, 32)
        ws = copies_of(lambda kind=kind: quantize(dense, kind, 32), first.nbytes())
        out.append(Kernel(f"ours {name}", first.nbytes(), product(kernels, ws)))
    return out


def torch_kernels(k: int, n: int) -> list[Kernel]:
    """torch's CPU int8 (per channel) and int4 (groups of 32, bfloat16 activations) products,
    and the dense float32 product; x's conversion to bfloat16 counts in int4's time."""
    out = []
    w8 = copies_of(lambda: torch.randint(-127, 128, (n, k), dtype=torch.int8), n * k)
    scales = torch.rand(n) * 0.01
    out.append(
        Kernel(
            "torch _weight_int8pack_mm",
            n * k,
            lambda i, x: torch.ops.aten._weight_int8pack_mm(x, w8[i], scales),
        )
    )
    packed = copies_of(
        lambda: torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.randint(0, 16, (n, k), dtype=torch.int32), 1
        ),
        n * k // 2,
    )
    scale_zeros = torch.rand(k // 32, n, 2).to(torch.bfloat16)
    out.append(
        Kernel(
            "torch _weight_int4pack_mm_for_cpu",
            n * k // 2 + scale_zeros.numel() * 2,
            lambda i, x: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(torch.bfloat16), packed[i], 32, scale_zeros
            ),
        )
    )
    dense = copies_of(lambda: torch.randn(n, k), n * k * 4)
    out.append(Kernel("torch F.linear float32", n * k * 4, lambda i, x: x @ dense[i].T))
    return out


def median_ms(kernel: Kernel, x: torch.Tensor, repeats: int) -> float:
    copies = MEMORY_BYTES // kernel.nbytes + 1
    for i in range(copies):
        kernel.run(i, x)
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        kernel.run(r % copies, x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def llama_cpp_ms(binary: Path, name: str, k: int, n: int, rows: list[int], repeats: int):
    """llama.cpp's median ms at each of `rows`."""
    levels = ",".join(map(str, rows))
    argv = [str(binary), GGML_NAMES[name], str(k), str(n), levels, "2", str(repeats)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return [float(line) for line in out.split()]


def build_ggml_bench(llama_cpp: Path) -> Path | None:
    """scripts/ggml_matmul_bench.c linked to llama.cpp's libggml, or None where it is absent."""
    libs = llama_cpp / "build" / "bin"
    if not (libs / "libggml-cpu.so").exists():
        return None
    out = Path("/tmp/ggml_matmul_bench")
    source = Path(__file__).with_name("ggml_matmul_bench.c")
    subprocess.run(
        ["gcc", "-O2", "-o", str(out), str(source), f"-I{llama_cpp / 'ggml' / 'include'}",
         f"-L{libs}", "-lggml", "-lggml-base", "-lggml-cpu", f"-Wl,-rpath,{libs}"],
        check=True,
    )  # fmt: skip
    return out


def main(
    rows: str = typer.Option("1,4,16,64"),
    repeats: int = typer.Option(15),
    llama_cpp: Path = typer.Option(Path.home() / ".cache/llama-server/llama.cpp"),
) -> None:
    torch.set_num_threads(2)
    levels = [int(r) for r in rows.split(",")]
    ggml_bench = build_ggml_bench(llama_cpp)
    print(f"| model, matrix (K×N) | kernel | {' | '.join(f'{r} rows' for r in levels)} |")
    print(f"|---|---|{'---|' * len(levels)}")
    for model, matrix, k, n in SHAPES:
        results: dict[str, list[str]] = {}
        for kernel in our_kernels(k, n) + torch_kernels(k, n):
            for r in levels:
                ms = median_ms(kernel, torch.randn(r, k), repeats)
                gbs = kernel.nbytes / ms / 1e6
                results.setdefault(kernel.name, []).append(f"{ms:.2f} ms ({gbs:.0f} GB/s)")
            del kernel
        for name in GGML_NAMES if ggml_bench else ():
            times = llama_cpp_ms(ggml_bench, name, k, n, levels, repeats)
            results[f"llama.cpp {name}"] = [f"{ms:.2f} ms" for ms in times]
        for name, cells in results.items():
            print(f"| {model} {matrix} ({k}×{n}) | {name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    typer.run(main)
