"""Every launcher flag, declared once: TGI's 54 with their names, env vars and defaults, then ours.

Each `Flag` says what it does here (`support`):
- `USED`: does what TGI's flag does;
- `OURS`: a flag TGI does not have;
- `NOT_APPLICABLE`: accepted, so TGI deployment files keep working, and logged as ignored when
  set to anything but its default (CUDA-only knobs on a CPU server, ngrok, speculation);
- `REFUSED`: accepted by the parser, refused with a clear message when set, because ignoring it
  would mislead (`--trust-remote-code` would silently not run the Hub's code).

The command line parser (`launcher.cli`), the docs table (`python -m launcher.flags`, in
docs/launcher-flags.md) and the tests all read this table. The parser is click's (typer's
foundation): typer builds options from one function's signature, which for 58 flags would be
one enormous function instead of this table.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import Enum
from typing import Any

import click


class Support(Enum):
    USED = "yes"
    OURS = "ours"
    NOT_APPLICABLE = "accepted, ignored"
    REFUSED = "refused when set"


@dataclass(frozen=True)
class Flag:
    name: str  # the long option without its dashes: "max-batch-size"
    default: Any = None
    type: Any = str  # a click type
    help: str = ""
    support: Support = Support.USED
    here: str = ""  # what it does here where that differs from TGI; the log or refusal text
    short: str | None = None
    is_flag: bool = False
    multiple: bool = False
    has_env: bool = True  # TGI's -e/--env has no env var

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def envvar(self) -> str | None:
        return self.dest.upper() if self.has_env else None

    def is_set(self, value: Any) -> bool:
        """Whether `value` differs from the default (a NOT_APPLICABLE flag is then logged)."""
        return value not in (None, False, (), []) and value != self.default


OURS, NA, R = Support.OURS, Support.NOT_APPLICABLE, Support.REFUSED
KV_CACHE_DTYPES = ["auto", "float32", "bfloat16", "float16", "fp8_e4m3fn", "fp8_e5m2"]
QUANTIZE_HELP = (
    "int8 (= eetq, per channel), int4 (groups of 32), gguf (a GGUF file's own blocks), gptq, awq "
    "or none. Default: the checkpoint's own (GGUF blocks, GPTQ/AWQ), else none"
)

# TGI's flags, in the order of its `--help` (launcher/src/main.rs).
TGI_FLAGS: tuple[Flag, ...] = (
    Flag("model-id", help="Local HF directory, .gguf file or Hub repo id",
         here="Default: the embedded SmolLM2-135M-Instruct (TGI: bigscience/bloom-560m)"),
    Flag("revision", help="Hub commit or branch"),
    Flag("validation-workers", 2, int, "Tokenizer worker processes in the router"),
    Flag("sharded", None, str, "Shard the model across processes (true|false)"),
    Flag("num-shard", None, int, "Tensor-parallel ranks",
         here="Default: entries in CUDA_VISIBLE_DEVICES, else NVIDIA_VISIBLE_DEVICES (all: "
         "nvidia-smi's count), else ZE_AFFINITY_MASK, else the GPUs nvidia-smi lists, else 1. "
         "Rank r runs on cuda:{r % visible GPUs}, else on the CPU"),
    Flag("quantize", None, str, "Weight quantization", here=QUANTIZE_HELP),
    Flag("speculate", None, int, "Tokens to speculate", NA,
         "No speculative decoding yet: ignored (outputs are the same, only speed differs)"),
    Flag("dtype", None, str, "float32, bfloat16 or float16",
         here="Default: on a GPU the checkpoint's (bfloat16 for a float32 one); on the CPU "
         "bfloat16 where it computes it natively (AVX512-BF16 or AMX), float32 elsewhere"),
    Flag("kv-cache-dtype", None, click.Choice(KV_CACHE_DTYPES), "KV cache dtype",
         here="auto (the model's dtype), float32, bfloat16 or float16 (halves a float32 "
         "model's cache on the CPU, as llama.cpp's f16 cache); TGI's fp8_e4m3fn/fp8_e5m2 are "
         "logged and keep the model's dtype"),
    Flag("trust-remote-code", False, bool, "Run the Hub repo's modelling code", R,
         "This server runs only its own model code, never a repo's: drop --trust-remote-code",
         is_flag=True),
    Flag("max-concurrent-requests", 128, int, "Requests in flight before 429"),
    Flag("max-best-of", 2, int),
    Flag("max-stop-sequences", 4, int),
    Flag("max-top-n-tokens", 5, int),
    Flag("max-input-tokens", None, int, here="Default: decided at warmup"),
    Flag("max-input-length", None, int, "Legacy name of --max-input-tokens"),
    Flag("max-total-tokens", None, int, here="Default: decided at warmup"),
    Flag("waiting-served-ratio", 0.3, float),
    Flag("max-batch-prefill-tokens", None, int, here="Default: 4096"),
    Flag("max-batch-total-tokens", None, int, here="Default: the KV cache's size"),
    Flag("max-waiting-tokens", 20, int),
    Flag("max-batch-size", None, int),
    Flag("cuda-graphs", None, str, "Decode batch sizes to capture CUDA graphs for; 0: none",
         here="Default 1,2,4,8,16,32; on a GPU with the triton attention backend (the CPU and "
         "other backends run eagerly)"),
    Flag("hostname", "0.0.0.0", str,
         here="A value that is no IP address (a container's name) listens on 0.0.0.0, as TGI"),
    Flag("port", 3000, int, short="p"),
    Flag("prometheus-port", 9000, int, "Port serving /metrics alone (any path)",
         here="A port already taken is logged and skipped; /metrics on --port always works"),
    Flag("shard-uds-path", "/tmp/text-generation-server", str,
         "Socket prefix: shard r listens on {path}-{r}"),
    Flag("master-addr", "localhost", str, "torch.distributed rendezvous address"),
    Flag("master-port", 29500, int, "torch.distributed rendezvous port"),
    Flag("huggingface-hub-cache", None, str, "Hugging Face Hub cache directory",
         here="Passed to every process as HUGGINGFACE_HUB_CACHE and HF_HUB_CACHE"),
    Flag("weights-cache-override", None, str, "Read the model from this directory",
         here="The model's files are read from this directory instead of the Hub"),
    Flag("disable-custom-kernels", False, bool, "Run PyTorch ops instead of our C kernels",
         here="The shards skip their compiled C kernels and run the PyTorch reference code",
         is_flag=True),
    Flag("cuda-memory-fraction", 1.0, float, "Share of each GPU's memory a shard may use",
         here="The KV cache takes --kv-cache-memory of what is free within it"),
    Flag("rope-scaling", None, click.Choice(["linear", "dynamic"]), "RoPE scaling type",
         here="Overrides the model's rope_scaling: linear, or dynamic (NTK)"),
    Flag("rope-factor", None, float, "RoPE scaling factor",
         here="Alone: linear scaling by this factor; with --rope-scaling alone: factor 1"),
    Flag("json-output", False, bool, "Log JSON lines", is_flag=True),
    Flag("otlp-endpoint", None, str, "OTLP gRPC collector, e.g. http://localhost:4317",
         here="Traces of the router and the shards (README: Tracing)"),
    Flag("otlp-service-name", "text-generation-inference.router", str, "OpenTelemetry service"),
    Flag("cors-allow-origin", None, str, "Allowed CORS origin (repeatable)", multiple=True),
    Flag("api-key", None, str, "Bearer token required on inference routes"),
    Flag("watermark-gamma", None, float, "Watermark green-list share",
         here="Default 0.5 in the shards, as TGI"),
    Flag("watermark-delta", None, float, "Watermark logit bias", here="Default 2.0, as TGI"),
    Flag("ngrok", False, bool, "ngrok tunnel", NA,
         "No ngrok tunnel (TGI's own has been removed): ignored", is_flag=True),
    Flag("ngrok-authtoken", None, str, "ngrok token", NA, "No ngrok tunnel: ignored"),
    Flag("ngrok-edge", None, str, "ngrok edge", NA, "No ngrok tunnel: ignored"),
    Flag("tokenizer-config-path", None, str,
         "tokenizer_config.json to use (its chat_template)"),
    Flag("disable-grammar-support", False, bool,
         "Refuse grammar, response_format and tool calls (422)", is_flag=True),
    Flag("env", False, bool, "Print the runtime environment, then launch", short="e",
         is_flag=True, has_env=False),
    Flag("max-client-batch-size", 4, int, "Prompts in one /v1/completions request"),
    Flag("lora-adapters", None, str, "LoRA adapters to load", R,
         "LoRA adapters are not supported yet: requests naming an adapter would get the base "
         "model"),
    Flag("usage-stats", "on", click.Choice(["on", "off", "no-stack"]), "Usage statistics", NA,
         "This server never sends usage statistics, whatever the value"),
    Flag("payload-limit", 2_000_000, int, "Maximum request body in bytes"),
    Flag("enable-prefill-logprobs", False, bool, "Allow prompt logprobs", is_flag=True),
    Flag("graceful-termination-timeout", 90.0, float,
         "Seconds the router may drain on SIGTERM before it is killed", short="g"),
)  # fmt: skip

OUR_FLAGS: tuple[Flag, ...] = (
    Flag("kv-cache-memory", None, str,
         "KV cache size: bytes (e.g. 2GiB) or a fraction of the memory free after warmup", OURS,
         "Default: 0.3 on the CPU, 0.9 on a GPU"),
    Flag("attention", "auto", str, "auto, sdpa, torch, flash or triton", OURS,
         "TGI's values (paged, flashdecoding, flashinfer) mean auto"),
    Flag("block-size", None, int, "Tokens per KV block", OURS,
         "Default: the attention backend's (16; flash-attn 256)"),
    Flag("cache-dir", None, str, "Where converted models live", OURS),
    Flag("batch-invariant", None, str,
         "true|false: a request's tokens and logprobs are the same bits whatever its batch, "
         "prefix cache hits and prompt chunking", OURS,
         "Default: true on the CPU, false on a GPU (vLLM's VLLM_BATCH_INVARIANT); false takes "
         "each step size's fastest path"),
    Flag("model-impl", "auto", str,
         "auto, native or transformers: the code that serves the model", OURS,
         "auto: the architecture's native family where there is one (shard/models/), else "
         "transformers' model code over the paged KV cache (vLLM's --model-impl)"),
)  # fmt: skip

FLAGS: tuple[Flag, ...] = TGI_FLAGS + OUR_FLAGS


def click_option(flag: Flag) -> click.Option:
    decls = [f"--{flag.name}", *([f"-{flag.short}"] if flag.short else []), flag.dest]
    return click.Option(
        decls,
        default=flag.default,
        type=None if flag.is_flag else flag.type,
        is_flag=flag.is_flag,
        multiple=flag.multiple,
        envvar=flag.envvar,
        show_envvar=flag.envvar is not None,
        show_default=flag.default not in (None, False),
        help=". ".join(p for p in (flag.help, flag.here) if p) or None,
    )


def markdown_table() -> str:
    """docs/launcher-flags.md's table: every flag, its env var and default, what it does here."""
    rows = [
        "| flag | env | default | here | notes |",
        "|---|---|---|---|---|",
    ]
    for flag in FLAGS:
        names = f"`--{flag.name}`" + (f", `-{flag.short}`" if flag.short else "")
        env = f"`{flag.envvar}`" if flag.envvar else "–"
        default = "–" if flag.default in (None, False) else f"`{flag.default}`"
        notes = "; ".join(p for p in (flag.help, flag.here) if p).replace("|", "\\|")
        rows.append(f"| {names} | {env} | {default} | {flag.support.value} | {notes} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
