"""The JSON shapes of TGI's generate routes, built from router events (field names, order,
nulls and omitted keys exactly as TGI sends them)."""

from __future__ import annotations

from router.batching.events import EndEvent, Token
from router.batching.infer import GenerateResult
from router.http.generation import Timings
from router.request import ValidatedRequest


def token_json(token: Token) -> dict:
    return {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special}


def prefill_token_json(token: Token) -> dict:
    return {"id": token.id, "text": token.text, "logprob": token.logprob}


def full_text(request: ValidatedRequest, text: str) -> str:
    return request.inputs + text if request.return_full_text else text


def sequence_json(request: ValidatedRequest, result: GenerateResult) -> dict:
    """The fields a Details and a BestOfSequence share, in TGI's order."""
    end = result.end
    sequence = {
        "finish_reason": end.finish_reason,
        "generated_tokens": end.generated_tokens,
        "seed": end.seed,
        "prefill": [prefill_token_json(t) for t in result.prefill],
        "tokens": [token_json(t) for t in result.tokens],
    }
    if request.top_n_tokens:
        sequence["top_tokens"] = [[token_json(t) for t in top] for top in result.top_tokens]
    return sequence


def details_json(
    request: ValidatedRequest,
    result: GenerateResult,
    best_of: list[GenerateResult] | None = None,
) -> dict:
    """`details`; `best_of_sequences` (the other best_of copies) only when best_of > 1."""
    details = sequence_json(request, result)
    if best_of is not None:
        details["best_of_sequences"] = [
            {"generated_text": full_text(request, other.end.generated_text)}
            | sequence_json(request, other)
            for other in best_of
        ]
    return details


def generate_response(
    request: ValidatedRequest,
    result: GenerateResult,
    best_of: list[GenerateResult] | None = None,
) -> dict:
    response = {"generated_text": full_text(request, result.end.generated_text)}
    if request.details or request.decoder_input_details:
        response["details"] = details_json(request, result, best_of)
    return response


def stream_event(
    index: int,
    request: ValidatedRequest,
    token: Token,
    top_tokens: list[Token],
    end: EndEvent | None = None,
) -> dict:
    """One `data:` event of /generate_stream; the last one carries the text and details."""
    event: dict = {"index": index, "token": token_json(token)}
    if top_tokens:
        event["top_tokens"] = [token_json(t) for t in top_tokens]
    event["generated_text"] = full_text(request, end.generated_text) if end else None
    event["details"] = None
    if end is not None and request.details:
        event["details"] = {
            "finish_reason": end.finish_reason,
            "generated_tokens": end.generated_tokens,
            "seed": end.seed,
            "input_length": request.input_length,
        }
    return event


# The x-* headers whose values are whole numbers (milliseconds or counts); besides them
# there are x-compute-time (seconds) and x-compute-type (a label).
INTEGER_TIMING_HEADERS = (
    "x-compute-characters",
    "x-total-time",
    "x-validation-time",
    "x-queue-time",
    "x-inference-time",
    "x-time-per-token",
    "x-prompt-tokens",
    "x-generated-tokens",
)


def timing_headers(
    request: ValidatedRequest, end: EndEvent, timings: Timings, compute_type: str
) -> dict[str, str]:
    """TGI's x-* timing headers (seconds, except x-time-per-token in milliseconds)."""
    received_at, validated_at, finished_at = timings.received, timings.validated, timings.finished
    queue = max(end.started_at - end.queued_at, 0.0)
    inference = max(finished_at - end.started_at, 0.0)
    per_token = inference / max(end.generated_tokens, 1)
    return {
        "x-compute-type": compute_type,
        "x-compute-time": f"{finished_at - received_at:.6f}",
        "x-compute-characters": str(len(request.inputs)),
        "x-total-time": str(int(1000 * (finished_at - received_at))),
        "x-validation-time": str(int(1000 * (validated_at - received_at))),
        "x-queue-time": str(int(1000 * queue)),
        "x-inference-time": str(int(1000 * inference)),
        "x-time-per-token": str(int(1000 * per_token)),
        "x-prompt-tokens": str(request.input_length),
        "x-generated-tokens": str(end.generated_tokens),
    }
