"""`python -m router`: the HTTP router. The launcher starts it once the shards are up."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Optional

import typer

from common.logs import python_level, setup_logging
from router.config import RouterConfig
from router.server import serve

app = typer.Typer(add_completion=False, help=__doc__)
log = logging.getLogger("router")


def bind_address(hostname: str) -> str:
    """`hostname` where it is an IP address, else 0.0.0.0, as TGI's router does: Docker and
    Kubernetes set HOSTNAME to the container's name, which is no address to bind."""
    try:
        return str(ipaddress.ip_address(hostname))
    except ValueError:
        log.warning("hostname %r is not an IP address: listening on 0.0.0.0", hostname)
        return "0.0.0.0"


@app.command()
def main(
    model_id: str = typer.Option(
        "HuggingFaceTB/SmolLM2-135M-Instruct", help="Name reported by /info"
    ),
    tokenizer_name: str = typer.Option(..., help="Local directory with tokenizer.json"),
    master_shard_uds_path: str = typer.Option("/tmp/text-generation-server-0"),
    hostname: str = typer.Option("0.0.0.0", envvar="HOSTNAME"),
    port: int = typer.Option(3000),
    max_concurrent_requests: int = typer.Option(128),
    max_best_of: int = typer.Option(2),
    max_stop_sequences: int = typer.Option(4),
    max_top_n_tokens: int = typer.Option(5),
    max_input_tokens: int | None = typer.Option(None),
    max_total_tokens: int | None = typer.Option(None),
    max_batch_prefill_tokens: int = typer.Option(4096),
    max_batch_total_tokens: int | None = typer.Option(None),
    max_batch_size: int | None = typer.Option(None),
    waiting_served_ratio: float = typer.Option(1.2),
    max_waiting_tokens: int = typer.Option(20),
    max_client_batch_size: int = typer.Option(4),
    validation_workers: int = typer.Option(2),
    payload_limit: int = typer.Option(2_000_000),
    api_key: str | None = typer.Option(
        None,
        envvar="API_KEY",
        help="Bearer key for inference routes; the launcher passes it in API_KEY, never on "
        "the command line, which every user of the machine can read",
    ),
    cors_allow_origin: list[str] = typer.Option([]),
    json_output: bool = typer.Option(False, "--json-output"),
    enable_prefill_logprobs: bool = typer.Option(False, "--enable-prefill-logprobs"),
    disable_grammar_support: bool = typer.Option(False, "--disable-grammar-support"),
    graceful_shutdown_timeout: float = typer.Option(90.0),
    log_level: str = typer.Option("info", envvar="LOG_LEVEL"),
    compute_type: str = typer.Option("cpu", envvar="COMPUTE_TYPE", help="x-compute-type"),
    prometheus_port: int = typer.Option(9000, help="Also serve /metrics alone on this port"),
    tokenizer_config_path: Optional[str] = typer.Option(
        None, help="tokenizer_config.json to use instead of the model's (its chat_template)"
    ),
    otlp_endpoint: Optional[str] = typer.Option(None, help="OTLP gRPC collector for traces"),
    otlp_service_name: str = typer.Option("text-generation-inference.router"),
) -> None:
    """Serves TGI's HTTP API in front of the shards."""
    flags = dict(locals())  # every option by name: they are RouterConfig's fields, but three
    try:
        setup_logging(json_output, python_level(log_level), "router")
    except ValueError as err:
        setup_logging(json_output, "info", "router")
        log.error("%s", err)
        raise typer.Exit(1) from err
    try:
        config = router_config(flags)
    except ValueError as err:
        log.error("invalid configuration: %s", err)
        raise typer.Exit(1) from err
    asyncio.run(serve(config))


def router_config(flags: dict) -> RouterConfig:
    """The command line's options as a RouterConfig; raises ValueError."""
    flags = dict(flags)
    del flags["log_level"]  # set up above, not part of the config
    tokenizer_dir = flags.pop("tokenizer_name")  # TGI's name for the router's flag
    hostname = bind_address(flags.pop("hostname"))
    origins = tuple(flags.pop("cors_allow_origin"))
    return RouterConfig(
        **flags, tokenizer_dir=tokenizer_dir, hostname=hostname, cors_allow_origin=origins
    )


if __name__ == "__main__":
    app()
