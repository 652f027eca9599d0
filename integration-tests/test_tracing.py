"""OpenTelemetry end to end: the launcher with `--otlp-endpoint` pointing at a real OTLP gRPC
receiver started here. The client's `traceparent` is the parent of the router's request span,
`validate`/`queued`/`infer` are its children, the batch's `prefill` links to `infer`, and the
shard's `Prefill` span is a child of the router's `prefill` across the gRPC hop. A collector
that is down never slows a request or the shutdown."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
import requests
from conftest import Launcher, free_port
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
SERVICE = "textgen-test"
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "200"}  # the SDK's batch delay, 5 s by default


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP gRPC trace collector that keeps every span it receives."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 (the gRPC method's name)
        with self.lock:
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append(
                            {
                                "name": span.name,
                                "service": attrs.get("service.name"),
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(),
                                "links": [link.span_id.hex() for link in span.links],
                                "attributes": {a.key: a.value for a in span.attributes},
                            }
                        )
        return trace_service_pb2.ExportTraceServiceResponse()

    def named(self, name: str) -> list[dict]:
        with self.lock:
            return [s for s in self.spans if s["name"] == name]

    def wait_for(self, name: str, where=lambda s: True, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [s for s in self.named(name) if where(s)]
            if found:
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"no {name!r} span arrived; got {[s['name'] for s in self.spans]}")


@pytest.fixture(scope="module")
def receiver():
    collector = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    collector.endpoint = f"http://127.0.0.1:{port}"
    yield collector
    server.stop(0)


@pytest.fixture(scope="module")
def traced(receiver):
    handle = Launcher(
        "otel",
        "--otlp-endpoint",
        receiver.endpoint,
        "--otlp-service-name",
        SERVICE,
        env=FAST_EXPORT,
    )
    yield handle
    handle.stop()


def test_spans_arrive_with_tgis_names_and_parents(traced, receiver) -> None:
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 4}}
    response = requests.post(
        f"{traced.url}/generate", json=body, headers={"traceparent": TRACEPARENT}, timeout=60
    )
    assert response.status_code == 200

    generate = receiver.wait_for("generate", lambda s: s["trace_id"] == TRACE_ID)
    assert generate["parent"] == CLIENT_SPAN and generate["service"] == SERVICE
    assert {"total_time", "queue_time", "inference_time", "time_per_token"} <= set(
        generate["attributes"]
    )
    children = {}
    for name in ("validate", "queued", "infer"):
        span = receiver.wait_for(name, lambda s: s["parent"] == generate["span_id"])
        assert span["trace_id"] == TRACE_ID
        children[name] = span

    # The batch that started the request links to its `infer` span ...
    prefill = receiver.wait_for("prefill", lambda s: children["infer"]["span_id"] in s["links"])
    # ... and the shard's span for that gRPC call is the batch span's child.
    shard = receiver.wait_for(
        "/generate.v3.TextGenerationService/Prefill",
        lambda s: s["parent"] == prefill["span_id"],
    )
    assert shard["trace_id"] == prefill["trace_id"]
    decode = receiver.wait_for("decode")
    receiver.wait_for(
        "/generate.v3.TextGenerationService/Decode", lambda s: s["parent"] == decode["span_id"]
    )


def test_a_request_without_traceparent_starts_its_own_trace(traced, receiver) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    response = requests.post(f"{traced.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200
    chat = receiver.wait_for("chat_completions")
    assert chat["parent"] == "" and chat["trace_id"] != TRACE_ID
    receiver.wait_for("validate", lambda s: s["parent"] == chat["span_id"])


def test_a_collector_that_is_down_blocks_nothing() -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    handle = Launcher("otel-down", "--otlp-endpoint", dead, env=FAST_EXPORT)
    try:
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 8}}
        for _ in range(3):
            start = time.monotonic()
            response = requests.post(f"{handle.url}/generate", json=body, timeout=60)
            assert response.status_code == 200
            assert time.monotonic() - start < 10
        time.sleep(1)  # let an export fail and its retries start
        start = time.monotonic()
        handle.stop()
        assert handle.process.returncode == 0
        assert time.monotonic() - start < 20  # the flush is bounded (2 s per process)
    finally:
        handle.stop()
