"""`python -m benchmark` (`make bench`): this server beside the naive transformers baseline and
llama.cpp's llama-server, on the same model and the same machine, in one run.

Every server gets the same chat-formatted prompts and generates exactly `--max-new-tokens`
tokens per request (`ignore_eos`), from closed-loop clients at each concurrency. The table
gives total generated tokens/s, then TTFT and TPOT, then each of our configurations' ratio to
llama-server and to the baseline. This machine is shared and noisy: compare ratios from one
run, never absolute figures across runs.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import typer
from tqdm import tqdm

from benchmark.loadgen import (
    Load,
    Report,
    StallReport,
    run_load,
    sequential_ttfts,
    stall_under_long_prompt,
)
from benchmark.servers import Running, ServerSpec, llama_kv_args, llama_server, naive, ours

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in one paragraph.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning' into Spanish and German.",
    "Give me a short recipe for pancakes.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
]
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")

app = typer.Typer(add_completion=False, help=__doc__)


def cpu_description() -> str:
    model, flags = "unknown CPU", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and model == "unknown CPU":
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    present = [f for f in SIMD_FLAGS if f in flags]
    return f"{model}; {len(present) and ' '.join(present) or 'no AVX2'}"


def chat_prompts(model_dir: Path) -> list[str]:
    """The prompts in the model's chat template, as raw text every server takes as is."""
    from router.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model_dir)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        for p in PROMPTS
    ]


def long_text(tokenizer, topic: str, tokens: int) -> str:
    """Instructions about `topic` of at least `tokens` tokens."""
    text, n = f"You are the assistant of a {topic} company.", 0
    while len(tokenizer.encode(text, add_special_tokens=False)) < tokens:
        n += 1
        text += f" Rule {n}: answer questions about {topic} item {n} briefly and politely."
    return text


def chat(tokenizer, system: str, question: str) -> str:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def shared_prefix_prompts(model_dir: Path, tokens: int) -> list[str]:
    """Three chat prompts: a warm-up with a system prompt of its own, then two questions after
    the same system prompt of at least `tokens` tokens (the second may reuse the first's K/V)."""
    from router.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model_dir)
    shared = long_text(tokenizer, "shipping", tokens)
    return [
        chat(tokenizer, long_text(tokenizer, "gardening", tokens), PROMPTS[0]),
        chat(tokenizer, shared, PROMPTS[1]),
        chat(tokenizer, shared, PROMPTS[2]),
    ]


def long_prompt(model_dir: Path, tokens: int) -> str:
    from router.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model_dir)
    return chat(tokenizer, long_text(tokenizer, "bakery", tokens), PROMPTS[3])


def shared_prefix_ttfts(url: str, dialect: str, prompts: list[str]) -> list[float]:
    """(first, second) TTFT after the shared system prompt; [] when a request failed."""
    try:
        _, first, second = asyncio.run(sequential_ttfts(url, dialect, prompts))
    except RuntimeError as err:
        print(f"  shared prefix: {err}", file=sys.stderr)
        return []
    print(f"  shared prefix TTFT: {first:.3f} s then {second:.3f} s", file=sys.stderr)
    return [first, second]


def stall(
    url: str, dialect: str, prompts: list[str], long: str, streams: int
) -> StallReport | None:
    try:
        report = asyncio.run(stall_under_long_prompt(url, dialect, prompts, long, streams))
    except RuntimeError as err:
        print(f"  long prompt: {err}", file=sys.stderr)
        return None
    print(
        f"  long prompt: running streams waited up to {report.worst_wait_ratio:.1f}x their "
        f"median TPOT; its TTFT {report.long_prompt_ttft:.2f} s",
        file=sys.stderr,
    )
    return report


# A JSON schema whose documents are longer than any benchmark request (at least 64 objects), so
# that a request with it runs max_new_tokens like the others, under the grammar all along.
LONG_JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 64,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 16},
                    "qty": {"type": "integer", "minimum": 0, "maximum": 999},
                },
                "required": ["name", "qty"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}


@dataclass
class Measured:
    reports: dict[int, Report] = field(default_factory=dict)
    grammar_reports: dict[int, Report] = field(default_factory=dict)  # ours, with LONG_JSON_SCHEMA
    prefix_ttfts: list[float] = field(default_factory=list)  # first, second
    stall: StallReport | None = None
    startup_s: float = 0.0  # until /health answered
    loaded_mib: float = 0.0  # resident memory of all its processes once healthy
    loading_peak_mib: float = 0.0  # ... and its peak until then
    peak_mib: float = 0.0  # ... and its peak over the whole run


@dataclass(frozen=True)
class Workload:
    """What every server of a run is given."""

    prompts: list[str]  # the load's chat prompts
    per_stream: int  # requests per client at each concurrency
    max_new_tokens: int
    prefix_tokens: int  # the shared system prompt's length (0: not measured)
    prefix_prompts: list[str]  # warm-up, then two questions after that system prompt
    long_tokens: int  # the long prompt's length (0: not measured)
    long_prompt: str  # arrives while `stall_streams` decode
    stall_streams: int
    log_dir: Path
    grammar: dict | None = None  # also load ours with this grammar on every request


def measure(
    spec: ServerSpec, streams: list[int], work: Workload, grammar: dict | None = None
) -> Measured:
    """The server's report at each concurrency (and with `grammar` on every request), its
    shared-prefix TTFTs and how its running streams fare when a long prompt arrives."""
    measured = Measured()
    print(f"starting {spec.name} ...", file=sys.stderr)
    try:
        server = Running(spec, work.log_dir)
    except (RuntimeError, TimeoutError) as err:  # its row stays empty; the others still run
        print(f"  skipped: {err}", file=sys.stderr)
        return measured
    try:
        if work.prefix_prompts:
            measured.prefix_ttfts = shared_prefix_ttfts(
                server.url, spec.dialect, work.prefix_prompts
            )
        if work.long_prompt:
            measured.stall = stall(
                server.url, spec.dialect, work.prompts, work.long_prompt, work.stall_streams
            )
        for n in streams:
            measured.reports[n] = load_at(server.url, spec, n, work)
            if grammar is not None:
                measured.grammar_reports[n] = load_at(server.url, spec, n, work, grammar)
    finally:
        measured.startup_s, measured.loaded_mib = server.startup_s, server.loaded_mib
        measured.loading_peak_mib = server.loading_peak_mib
        server.stop()
        measured.peak_mib = server.memory.peak_mib
    return measured


def memory_table(measured: dict[str, Measured]) -> str:
    rows = [
        "| server | start-up | memory once loaded | peak while loading | peak while serving |",
        "|---|---|---|---|---|",
    ]
    for name, m in measured.items():
        if m.startup_s:
            rows.append(
                f"| {name} | {m.startup_s:.1f} s | {m.loaded_mib:,.0f} MiB | "
                f"{m.loading_peak_mib:,.0f} MiB | {m.peak_mib:,.0f} MiB |"
            )
    return "\n".join(rows)


def load_at(
    url: str, spec: ServerSpec, streams: int, work: Workload, grammar: dict | None = None
) -> Report:
    requests = max(streams * work.per_stream, 2)
    load = Load(streams, requests, work.max_new_tokens, spec.dialect, grammar)
    label = f"{spec.name}{' + grammar' if grammar else ''} @ {streams}"
    with tqdm(total=load.requests, desc=label, file=sys.stderr, leave=False) as bar:
        report = asyncio.run(run_load(url, load, work.prompts, lambda done, total: bar.update(1)))
    print(
        f"  {streams:>2} streams{' with a grammar' if grammar else ''}: "
        f"{report.tokens_per_second:7.1f} tok/s, {report.errors} errors",
        file=sys.stderr,
    )
    return report


def table(
    results: dict[str, dict[int, Report]],
    streams: list[int],
    ours_names: list[str],
    llama: str | None,
    baseline: str | None,
) -> str:
    head = "| server | " + " | ".join(f"{n} stream{'s' * (n > 1)}" for n in streams)
    ttft_at = 16 if 16 in streams else streams[-1]
    lines = [head + f" | TTFT p50 @{ttft_at} | TPOT p50 @{ttft_at} |"]
    lines.append("|---" * (len(streams) + 3) + "|")
    for name, reports in results.items():
        cells = [f"{reports[n].tokens_per_second:.1f}" if n in reports else "—" for n in streams]
        last = reports.get(ttft_at)
        ttft = f"{last.summary()['ttft_p50']:.2f} s" if last else "—"
        tpot = f"{last.summary()['tpot_p50'] * 1000:.0f} ms" if last else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ttft} | {tpot} |")
    for reference in (r for r in (llama, baseline) if r is not None):
        for name in ours_names:
            ratios = []
            for n in streams:
                ref, own = results[reference].get(n), results[name].get(n)
                ok = ref and own and ref.tokens_per_second
                ratios.append(
                    f"{own.tokens_per_second / ref.tokens_per_second:.2f}×" if ok else "—"
                )
            lines.append(f"| {name} ÷ {reference} | " + " | ".join(ratios) + " | | |")
    return "\n".join(lines)


def grammar_table(measured: dict[str, Measured], streams: list[int]) -> str:
    lines = [
        "Every request under a JSON-schema grammar (LONG_JSON_SCHEMA) against none:",
        "| server | streams | tok/s | with grammar | TPOT p50 | with grammar | TPOT ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in measured.items():
        for n in streams:
            plain, constrained = m.reports.get(n), m.grammar_reports.get(n)
            if plain is None or constrained is None or not plain.tpot or not constrained.tpot:
                continue
            a, b = plain.summary()["tpot_p50"], constrained.summary()["tpot_p50"]
            lines.append(
                f"| {name} | {n} | {plain.tokens_per_second:.1f} | "
                f"{constrained.tokens_per_second:.1f} | {a * 1000:.1f} ms | {b * 1000:.1f} ms | "
                f"{b / a:.2f} |"
            )
    return "\n".join(lines)


def prefix_table(ttfts: dict[str, list[float]], tokens: int) -> str:
    lines = [
        f"Shared {tokens}-token system prompt, two questions one after the other (TTFT):",
        "| server | first | second | second ÷ first |",
        "|---|---|---|---|",
    ]
    for name, pair in ttfts.items():
        if pair:
            first, second = pair
            lines.append(f"| {name} | {first:.3f} s | {second:.3f} s | {second / first:.2f} |")
    return "\n".join(lines)


def stall_table(stalls: dict[str, StallReport | None], tokens: int, streams: int) -> str:
    lines = [
        f"{streams} streams decoding when a {tokens}-token prompt arrives:",
        "| server | longest wait ÷ median TPOT | median TPOT | long prompt TTFT |",
        "|---|---|---|---|",
    ]
    for name, r in stalls.items():
        if r is not None:
            lines.append(
                f"| {name} | {r.worst_wait_ratio:.1f} | {r.median_tpot * 1000:.0f} ms "
                f"| {r.long_prompt_ttft:.2f} s |"
            )
    return "\n".join(lines)


@app.command()
def main(
    model_id: str = typer.Option(
        "", help="A local model directory (default: the embedded SmolLM2)"
    ),
    gguf: str = typer.Option("", help="The GGUF llama-server serves (default: the embedded one)"),
    ours_args: list[str] = typer.Option(
        ["", "--quantize none"],
        "--ours",
        help="Launcher flags of one configuration of this server (repeatable)",
    ),
    streams: str = typer.Option("1,4,16,32", help="Concurrency levels"),
    per_stream: int = typer.Option(3, help="Requests per client at each level"),
    max_new_tokens: int = typer.Option(128),
    llama_server_bin: str = typer.Option(
        str(Path.home() / ".cache/llama-server/llama-server"),
        "--llama-server",
        help="llama-server binary (../shared/tools/build-llama-server.sh builds it); "
        "skipped when absent",
    ),
    baseline: bool = typer.Option(True, help="Run the naive transformers baseline"),
    baseline_streams: str = typer.Option("1", help="Its concurrency levels (it serializes)"),
    baseline_dtype: str = typer.Option("bfloat16"),
    shared_prefix_tokens: int = typer.Option(
        1000, help="System prompt length of the prefix-cache TTFT measurement (0: skip it)"
    ),
    long_prompt_tokens: int = typer.Option(
        2000, help="Prompt that arrives while streams decode (0: skip the stall measurement)"
    ),
    stall_streams: int = typer.Option(4, help="Streams decoding when the long prompt arrives"),
    grammar: bool = typer.Option(
        False, help="Also load ours with a JSON-schema grammar on every request"
    ),
    model_size: str = typer.Option(
        "",
        help="A random-weight model of a real shape (benchmark/model_sizes.py: llama3-1b, "
        "llama3-8b), made by llama.cpp's converter and llama-quantize; both servers serve "
        "that GGUF (ours with --model-id set to it)",
    ),
    model_type: str = typer.Option("Q4_K_M", help="llama-quantize type of --model-size"),
    match_kv: bool = typer.Option(
        True,
        help="Give ours llama-server's KV cache (its -c tokens, float16) where a configuration "
        "does not size its own, so that the memory table compares like with like",
    ),
) -> None:
    """Runs every server at every concurrency and prints the table."""
    from shard.checkpoint.convert import default_cache_dir, default_gguf_path, ensure_converted

    if model_size:
        from benchmark.model_sizes import build_gguf

        gguf = str(build_gguf(model_size, model_type))
        ours_args = [f"--model-id {gguf} {a}".strip() for a in ours_args]
    gguf_path = gguf or str(default_gguf_path())
    model_dir = Path(model_id) if model_id else ensure_converted(gguf_path, default_cache_dir())
    levels = [int(n) for n in streams.split(",")]
    per_slot = max(512, shared_prefix_tokens + 256, long_prompt_tokens + 256)  # llama's -c is
    slots = max(*levels, stall_streams + 1)  # shared by its slots
    context = slots * per_slot
    has_llama = Path(llama_server_bin).exists()
    kv = {a: llama_kv_args(a, context) if has_llama and match_kv else "" for a in ours_args}
    specs: list[tuple[ServerSpec, list[int]]] = [(ours(a, kv[a]), levels) for a in ours_args]
    llama_name = baseline_name = None
    if has_llama:
        spec = llama_server(llama_server_bin, gguf_path, slots, context)
        specs.append((spec, levels))
        llama_name = spec.name
    else:
        print(f"no llama-server at {llama_server_bin}: skipped", file=sys.stderr)
    if baseline:
        spec = naive(str(model_dir), baseline_dtype)
        specs.append((spec, [int(n) for n in baseline_streams.split(",")]))
        baseline_name = spec.name
    work = Workload(
        prompts=chat_prompts(model_dir),
        per_stream=per_stream,
        max_new_tokens=max_new_tokens,
        prefix_tokens=shared_prefix_tokens,
        prefix_prompts=(
            shared_prefix_prompts(model_dir, shared_prefix_tokens) if shared_prefix_tokens else []
        ),
        long_tokens=long_prompt_tokens,
        long_prompt=long_prompt(model_dir, long_prompt_tokens) if long_prompt_tokens else "",
        stall_streams=stall_streams,
        log_dir=Path(tempfile.mkdtemp(prefix="textgen-bench-")),
        grammar={"type": "json", "value": LONG_JSON_SCHEMA} if grammar else None,
    )
    ours_names = [s.name for s, _ in specs[: len(ours_args)]]
    measured = {
        spec.name: measure(
            spec, spec_levels, work, work.grammar if spec.name in ours_names else None
        )
        for spec, spec_levels in specs
    }
    notes = tuple(f"{ours(a).name}: KV cache as llama-server's, {e}" for a, e in kv.items() if e)
    print_report(measured, work, levels, ours_names, llama_name, baseline_name, notes)


def print_report(
    measured: dict[str, Measured],
    work: Workload,
    levels: list[int],
    ours_names: list[str],
    llama_name: str | None,
    baseline_name: str | None,
    notes: tuple[str, ...] = (),
) -> None:
    print(f"\nCPU: {cpu_description()}")
    print(
        f"{work.max_new_tokens} new tokens per request (ignore_eos), {work.per_stream} requests "
        f"per client, chat-formatted prompts; total generated tokens/s. Logs: {work.log_dir}\n"
    )
    results = {name: m.reports for name, m in measured.items()}
    print(table(results, levels, ours_names, llama_name, baseline_name))
    if work.prefix_tokens:
        ttfts = {name: m.prefix_ttfts for name, m in measured.items()}
        print("\n" + prefix_table(ttfts, work.prefix_tokens))
    if work.long_tokens:
        stalls = {name: m.stall for name, m in measured.items()}
        print("\n" + stall_table(stalls, work.long_tokens, work.stall_streams))
    if work.grammar:
        print("\n" + grammar_table(measured, levels))
    print("\nResident memory of each server's processes (all of them: launcher, router, shards):")
    print(memory_table(measured))
    for note in notes:
        print(note)


if __name__ == "__main__":
    app()
