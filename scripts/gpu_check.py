"""The GPU device check: on one CUDA GPU, in one command of under 10 minutes, with no network.

    python3 scripts/gpu_check.py prepare build/gpu-check   # on the CPU box: tokenizer, config
    python3 scripts/gpu_check.py run build/gpu-check OUT    # on the GPU machine

`run` builds random-weight checkpoints from two real configs (SmolLM2-135M's, and a ~1B Llama
with SmolLM2's vocabulary), then:
  1. greedy tokens: our model (the shard's ModelRunner, CUDA graphs on) against transformers
     on the same GPU and weights, teacher-forced over 4 prompts x 32 tokens: float32 with TF32
     off (must agree exactly) and bfloat16 (agreement reported);
  2. a real launcher + router serving the ~1B model in bfloat16 at 1, 16, 64 and 256 concurrent
     streams of 128 new tokens: tok/s, TTFT and TPOT; transformers' generate() with a static
     cache at batch 1 and 16 in the same run; the bandwidth roofline (weight bytes / 4.8 TB/s);
and writes the table to OUT/gpu_check.md. scripts/gpu_check.sh wraps both steps.

`run --smoke` does the same on the CPU with tiny models, 1 and 4 streams and 8 tokens: the test
suite runs it, so the script works on the day a GPU is there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

START = time.monotonic()
H200_BANDWIDTH = 4.8e12  # bytes/s, HBM3e
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
LLAMA_1B = dict(  # Llama-3.2-1B's shape with SmolLM2's 49152-token vocabulary: 1.07B parameters
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)


TINY = dict(LLAMA_1B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip


@dataclass(frozen=True)
class Plan:
    device: str = "cuda"
    new_tokens: int = 128
    streams: tuple[int, ...] = (1, 16, 64, 256)
    batches: tuple[int, ...] = (1, 16)  # transformers' generate()
    greedy_tokens: int = 32
    small: dict = field(default_factory=dict)  # None: SmolLM2-135M's config
    large: dict = field(default_factory=lambda: LLAMA_1B)


SMOKE = Plan(device="cpu", new_tokens=8, streams=(1, 4), batches=(1, 4), greedy_tokens=6,
             small=TINY, large=dict(TINY, num_hidden_layers=3))  # fmt: skip


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def log(message: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {message}", flush=True)


# ---- prepare (CPU box) ------------------------------------------------------------------------


def prepare(folder: Path) -> None:
    """SmolLM2's tokenizer files and config, from the embedded default model."""
    from shard.checkpoint.convert import default_cache_dir, default_gguf_path, ensure_converted

    model_dir = ensure_converted(default_gguf_path(), default_cache_dir())
    target = folder / "smollm2"
    target.mkdir(parents=True, exist_ok=True)
    for name in (*TOKENIZER_FILES, "config.json"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, target / name)
    log(f"tokenizer and config of SmolLM2-135M in {target}")


# ---- checkpoints ------------------------------------------------------------------------------


def smollm2_config(folder: Path) -> dict:
    raw = json.loads((folder / "smollm2" / "config.json").read_text())
    keep = ("torch_dtype", "dtype", "quantization_config")
    return {k: v for k, v in raw.items() if k not in keep}


def build_checkpoint(name: str, config: dict, folder: Path, work: Path, device: str) -> Path:
    """A random-weight checkpoint (bfloat16 safetensors) with SmolLM2's tokenizer."""
    import transformers

    out = work / name
    if (out / "config.json").exists():
        return out
    vocab = json.loads((folder / "smollm2" / "config.json").read_text())["vocab_size"]
    hf_config = transformers.LlamaConfig(
        **{**config, "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2}
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    for file in TOKENIZER_FILES:
        if (folder / "smollm2" / file).exists():
            shutil.copy(folder / "smollm2" / file, out / file)
    params = sum(p.numel() for p in model.parameters())
    log(f"{name}: {params / 1e9:.2f}B parameters, saved to {out}")
    del model
    free(device)
    return out


def weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


# ---- 1. greedy tokens against transformers ----------------------------------------------------


def prompts(vocab: int, count: int = 4, length: int = 24) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(count)]


def oracle(model_dir: Path, dtype: torch.dtype, prompt_ids: list[list[int]], new: int, device: str):
    """transformers' greedy continuations and logits: [(ids, prompt_len, logits)]."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(device).eval()
    out = []
    with torch.inference_mode():
        for ids in prompt_ids:
            inp = torch.tensor([ids], device=device)
            full = model.generate(
                inp, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
            )
            logits = model(full).logits[0].float()
            out.append((full[0].tolist(), len(ids), logits))
    del model
    free(device)
    return out


def greedy_agreement(model_dir: Path, dtype: str, new: int, device: str) -> tuple[float, int, str]:
    """Teacher-forced argmax agreement of our runner (graphs on) with transformers' greedy."""
    from shard.bootstrap import load_generator
    from shard.config import MemoryBudget, ShardConfig
    from shard.quant.quality import compare

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    reference = oracle(model_dir, getattr(torch, dtype), prompts(vocab), new, device)
    config = ShardConfig(
        model_dir=str(model_dir),
        model_id=model_dir.name,
        dtype=dtype,
        device=device,
        kv_cache_memory=MemoryBudget(bytes=2**30),
    )
    generator, backend = load_generator(config)
    runner = generator.runner
    runner.allocate_cache(256)
    runner.capture_graphs((1, 2, 4), 1024)
    quality = compare(runner, reference)
    replays = runner.graphs.replays if runner.graphs is not None else 0
    del generator, runner
    free(device)
    return quality.agreement, quality.positions, f"{backend}, {replays} graph replays"


# ---- 2. the server under load -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model_dir: Path, out: Path, device: str, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [
        sys.executable, "-m", "launcher", "--model-id", str(model_dir), "--port", str(port),
        "--hostname", "127.0.0.1", "--max-concurrent-requests", "512",
        "--dtype", "bfloat16" if device == "cuda" else "float32",
        "--max-batch-prefill-tokens", "8192", "--max-total-tokens", "1024",
        "--shard-uds-path", f"/tmp/gpu-check-{os.getpid()}", "--master-port", str(free_port()),
        "--prometheus-port", str(free_port()),
    ]  # fmt: skip
    argv += list(extra)
    if device == "cpu":
        argv += ["--kv-cache-memory", "64MiB"]
    logfile = open(out / "server.log", "w")  # noqa: SIM115 (lives as long as the server)
    process = subprocess.Popen(
        argv, cwd=ROOT, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    import requests

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = (out / "server.log").read_text()[-3000:]
            raise RuntimeError(f"the launcher exited with {process.returncode}:\n{tail}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except requests.ConnectionError:
            pass
        time.sleep(1)
    raise TimeoutError("the server did not become healthy in 300 s")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def load_table(url: str, text_prompts: list[str], plan: Plan) -> list[dict]:
    from benchmark.loadgen import Load, run_load

    rows = []
    for streams in plan.streams:
        load = Load(concurrency=streams, requests=streams, max_new_tokens=plan.new_tokens)
        report = asyncio.run(run_load(url, load, text_prompts))
        summary = report.summary()
        rows.append({"streams": streams, "errors": report.errors, **summary})
        log(
            f"{streams:4d} streams: {summary['tok/s']:8.1f} tok/s, TTFT p50 "
            f"{summary['ttft_p50'] * 1000:7.1f} ms, TPOT p50 {summary['tpot_p50'] * 1000:6.2f} ms"
            f", {report.errors} errors"
        )
    return rows


def sampling_check(url: str) -> str:
    """Sampling on the device: 8 concurrent requests with every warper and penalty; the same
    seed must give the same text, whatever else is in the batch."""
    from concurrent.futures import ThreadPoolExecutor

    import requests

    def ask(seed: int) -> str:
        parameters = {
            "max_new_tokens": 16, "do_sample": True, "temperature": 0.8, "top_k": 50,
            "top_p": 0.9, "typical_p": 0.95, "repetition_penalty": 1.2,
            "frequency_penalty": 0.5, "seed": seed,
        }  # fmt: skip
        body = {"inputs": "Tell me a story.", "parameters": parameters}
        response = requests.post(f"{url}/generate", json=body, timeout=120)
        response.raise_for_status()
        return response.json()["generated_text"]

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(ask, [1, 2, 3, 4, 1, 2, 3, 4]))
    alone = ask(1)
    same = texts[0] == texts[4] == alone and texts[1] == texts[5]
    verdict = "seeded draws reproduce" if same else "SEEDED DRAWS DIFFER"
    log(f"sampling: {verdict}")
    return verdict


def invariance_check(model_dir: Path, out: Path, device: str) -> str:
    """`--batch-invariant true` (the triton backend and kernels on a GPU): a greedy and a
    seeded request alone, then among 15 concurrent others of random lengths, one of them a
    long prompt; every token id and logprob must be the same bits."""
    from concurrent.futures import ThreadPoolExecutor

    import requests

    process, url = start_server(model_dir, out, device, ("--batch-invariant", "true"))

    def ask(prompt: str, seeded: bool) -> list:
        parameters = {"max_new_tokens": 16, "details": True, "decoder_input_details": False}
        if seeded:
            parameters.update(do_sample=True, seed=7, temperature=0.8, top_p=0.9)
        body = {"inputs": prompt, "parameters": parameters}
        response = requests.post(f"{url}/generate", json=body, timeout=300)
        response.raise_for_status()
        return [(t["id"], t["logprob"]) for t in response.json()["details"]["tokens"]]

    try:
        target = "Request: tell me about invariance. " * 8
        alone = [ask(target, False), ask(target, True)]
        others = [f"Other {i}: " + "words " * (7 * i) for i in range(15)]
        others[3] = "A long one. " * 120  # within --max-total-tokens 1024
        with ThreadPoolExecutor(17) as pool:
            crowd = [pool.submit(ask, text, i % 2 == 0) for i, text in enumerate(others)]
            crowded = [pool.submit(ask, target, False), pool.submit(ask, target, True)]
            [c.result() for c in crowd]
            same = [c.result() for c in crowded] == alone
    finally:
        stop_server(process)
    verdict = "same bits alone and among 15 others" if same else "OUTPUTS DIFFER WITH THE BATCH"
    log(f"batch invariance: {verdict}")
    return verdict


def transformers_generate(model_dir: Path, batch: int, prompt_ids: list[int], plan: Plan) -> float:
    """tok/s of transformers' generate() with a static cache, bfloat16, greedy, EOS ignored."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model = model.to(plan.device).eval()
    inputs = torch.tensor([prompt_ids] * batch, device=plan.device)
    kwargs = dict(
        max_new_tokens=plan.new_tokens,
        min_new_tokens=plan.new_tokens,
        do_sample=False,
        cache_implementation="static",
        pad_token_id=0,
    )
    with torch.inference_mode():
        model.generate(inputs, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        sync(plan.device)
        start = time.perf_counter()
        model.generate(inputs, **kwargs)
        sync(plan.device)
        seconds = time.perf_counter() - start
    del model
    free(plan.device)
    return batch * plan.new_tokens / seconds


# ---- the report -------------------------------------------------------------------------------


def report(results: dict, out: Path, plan: Plan) -> str:
    lines = [
        f"# GPU check: {results['gpu']}, torch {torch.__version__}",
        "",
        f"## Greedy tokens against transformers (teacher-forced, 4 prompts x "
        f"{plan.greedy_tokens} tokens)",
        "",
        "| model | dtype | agreement | positions | path |",
        "|---|---|---|---|---|",
    ]
    for row in results["greedy"]:
        lines.append(
            f"| {row['model']} | {row['dtype']} | {row['agreement']:.1%} | {row['positions']} "
            f"| {row['path']} |"
        )
    roofline = results["roofline"]
    lines += [
        "",
        f"## Serving {results['served']} ({plan.new_tokens} new tokens per stream, server "
        f"flags: {results.get('server_flags', 'none started')})",
        "",
        f"Bandwidth roofline at 1 stream: {roofline:.0f} tok/s "
        f"({results['weight_bytes'] / 1e9:.2f} GB of weights / 4.8 TB/s).",
        "",
        "| streams | tok/s | TTFT p50 (ms) | TPOT p50 (ms) | errors | vs roofline |",
        "|---|---|---|---|---|---|",
    ]
    for row in results.get("load") or []:
        lines.append(
            f"| {row['streams']} | {row['tok/s']:.1f} | {row['ttft_p50'] * 1000:.1f} | "
            f"{row['tpot_p50'] * 1000:.2f} | {row['errors']} | {row['tok/s'] / roofline:.2f}x |"
        )
    lines += [
        "",
        f"Sampling (8 concurrent seeded requests, every warper): {results.get('sampling')}.",
        "",
        f"Batch invariance (`--batch-invariant true`, {results.get('invariance_model')}): "
        f"{results.get('invariance')}.",
    ]
    lines += ["", "| transformers generate(), static cache | tok/s |", "|---|---|"]
    for batch, tps in results["transformers"].items():
        lines.append(f"| batch {batch} | {tps:.1f} |")
    for name, error in results.get("failures", {}).items():
        lines += ["", f"FAILED {name}: {error}"]
    text = "\n".join(lines) + "\n"
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    return text


def attempt(results: dict, name: str, fn, *args):
    """fn(*args), or None with the failure logged and recorded: one broken part of a one-shot
    run on a borrowed GPU must not cost the figures of the others."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 (reported in the table, with its traceback logged)
        log(f"{name} FAILED: {err!r}\n{traceback.format_exc()}")
        results.setdefault("failures", {})[name] = repr(err)[:500]
        return None


def serve_and_load(results: dict, large: Path, out: Path, plan: Plan) -> None:
    """The load table from a server with CUDA graphs, else (if that one fails) without."""
    text_prompts = [f"Request {i}: tell me about the number {i}." for i in range(256)]
    for extra in ((), ("--cuda-graphs", "0")):
        started = attempt(results, f"server {' '.join(extra) or 'defaults'}", start_server,
                          large, out, plan.device, extra)  # fmt: skip
        if started is None:
            continue
        process, url = started
        log(f"server up at {url} ({' '.join(extra) or 'defaults'})")
        try:
            results["server_flags"] = " ".join(extra) or "defaults"
            results["load"] = attempt(results, "load", load_table, url, text_prompts, plan)
            results["sampling"] = attempt(results, "sampling", sampling_check, url)
        finally:
            stop_server(process)
        if results["load"] is not None:
            return


def run(folder: Path, out: Path, plan: Plan) -> None:
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_CHECK_WORK", f"/tmp/gpu-check-models-{plan.device}"))
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 in both models
    torch.backends.cudnn.allow_tf32 = False
    gpu = torch.cuda.get_device_name(0) if plan.device == "cuda" else "CPU (smoke run)"
    results: dict = {"gpu": gpu, "greedy": [], "transformers": {}}
    log(f"{results['gpu']}, torch {torch.__version__}")
    small_config = plan.small or smollm2_config(folder)
    small = build_checkpoint("smollm2-135m", small_config, folder, work, plan.device)
    large = build_checkpoint("llama-1b", plan.large, folder, work, plan.device)
    for model_dir, dtype in ((small, "float32"), (large, "float32"), (large, "bfloat16")):
        name = f"greedy {model_dir.name} {dtype}"
        found = attempt(results, name, greedy_agreement, model_dir, dtype, plan.greedy_tokens,
                        plan.device)  # fmt: skip
        if found is None:
            continue
        agreement, positions, path = found
        results["greedy"].append(
            {"model": model_dir.name, "dtype": dtype, "agreement": agreement,
             "positions": positions, "path": path}
        )  # fmt: skip
        log(f"{name}: {agreement:.1%} of {positions} ({path})")
    results["served"] = large.name
    results["weight_bytes"] = weight_bytes(large)
    results["roofline"] = H200_BANDWIDTH / results["weight_bytes"]
    serve_and_load(results, large, out, plan)
    results["invariance_model"] = small.name
    results["invariance"] = attempt(
        results, "invariance", invariance_check, small, out, plan.device
    )
    vocab = json.loads((large / "config.json").read_text())["vocab_size"]
    prompt_ids = prompts(vocab, 1, 24)[0]
    for batch in plan.batches:
        tps = attempt(results, f"transformers batch {batch}", transformers_generate, large,
                      batch, prompt_ids, plan)  # fmt: skip
        if tps is not None:
            results["transformers"][batch] = tps
            log(f"transformers generate() batch {batch}: {tps:.1f} tok/s")
    print(report(results, out, plan), flush=True)
    log("done" if not results.get("failures") else f"done, {len(results['failures'])} failures")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["prepare", "run"])
    parser.add_argument("folder", type=Path, help="tokenizer and config (made by prepare)")
    parser.add_argument("out", type=Path, nargs="?", default=Path("gpu-check-out"))
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.folder)
    else:
        run(args.folder, args.out, SMOKE if args.smoke else Plan())


if __name__ == "__main__":
    main()
