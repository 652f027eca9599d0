"""Compiles the shard's C kernels into shared libraries, one per instruction-set variant.

Run by setup.py when the package is built or installed (`pip install .`, a wheel, `make
install`), so that serving needs no compiler: shard/native.py picks the best variant this CPU
runs at start-up. Standard library only: setup.py loads this file before torch or the
package can be imported.

    python shard/native_build.py OUT_DIR        (what setup.py does, by hand)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent  # the shard package
# The kernels a shard loads (each #includes what it needs: simd.h, and the C decoder the
# attention and quantized kernels).
SOURCES = (
    "attention/paged_decode.c",
    "layers/dense.c",
    "layers/fused.c",
    "models/llama_decode.c",
    "quant/kernels.c",
    "quant/ggml_kernels.c",
    "sampling/grammar_mask.c",
)
CFLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Variant:
    name: str
    march: tuple[str, ...]  # the compiler's instruction-set flags
    needs: frozenset[str]  # /proc/cpuinfo flags a CPU must have to run it


V3 = frozenset({"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe"})  # x86-64-v3
AVX512 = frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl"})
X86_VARIANTS = (  # best first
    Variant(
        "avx512vnni",
        ("-march=x86-64-v3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni"),
        V3 | AVX512 | {"avx512_vnni"},
    ),  # fmt: skip
    Variant(
        "avx512",
        ("-march=x86-64-v3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"),
        V3 | AVX512,
    ),  # fmt: skip
    Variant("avx2", ("-march=x86-64-v3",), V3),
    Variant("generic", ("-march=x86-64",), frozenset()),
)


def variants() -> tuple[Variant, ...]:
    if platform.machine() in ("x86_64", "AMD64"):
        return X86_VARIANTS
    return (Variant("generic", (), frozenset()),)


def sources_digest() -> str:
    """One hash of every C source and header of the package: what the libraries depend on."""
    files = sorted(p for p in ROOT.rglob("*.[ch]") if "_kernels" not in p.parts)
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def library_name(source: str, variant: str) -> str:
    return f"{Path(source).stem}-{variant}.so"


def compile_library(compiler: str, source: Path, flags: list[str], target: Path) -> None:
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    done = subprocess.run(
        [compiler, *CFLAGS, *flags, str(source), "-o", str(tmp), "-lm"],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {source.name} {' '.join(flags)} failed:\n{done.stderr}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)  # atomic: a concurrent reader never sees half a library


def up_to_date(out_dir: Path) -> bool:
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    names = [library_name(s, v.name) for s in SOURCES for v in variants()]
    return manifest.get("sources") == sources_digest() and all(
        (out_dir / n).exists() for n in names
    )


def build_all(out_dir: Path, compiler: str | None = None, jobs: int | None = None) -> Path:
    """Every kernel in every variant into out_dir, with the manifest that names the sources
    they were built from (written last: a manifest means a complete set)."""
    compiler = compiler or shutil.which(os.environ.get("CC", "gcc"))
    if compiler is None:
        raise RuntimeError("no C compiler (gcc or $CC) to build the kernels with")
    out_dir.mkdir(parents=True, exist_ok=True)
    if up_to_date(out_dir):  # pip runs setup.py more than once per install
        return out_dir
    (out_dir / MANIFEST).unlink(missing_ok=True)

    def build(source: str, variant: Variant) -> None:
        target = out_dir / library_name(source, variant.name)
        compile_library(compiler, ROOT / source, list(variant.march), target)

    with ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        futures = [pool.submit(build, s, v) for s in SOURCES for v in variants()]
        for future in futures:
            future.result()  # the first failure is raised
    manifest = {"sources": sources_digest(), "variants": [v.name for v in variants()]}
    (out_dir / MANIFEST).write_text(json.dumps(manifest) + "\n")
    return out_dir


if __name__ == "__main__":
    print(build_all(Path(sys.argv[1])))
