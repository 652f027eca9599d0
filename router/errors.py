"""Every error the HTTP layer turns into a response, with TGI's texts, types and status codes.

Two families:
  * `InferError` (the base) and its subclasses mirror TGI's `InferError`
    (`router/src/infer/mod.rs`): the body is JSON `{"error": str(e), "error_type": e.error_type}`,
    and on `/generate_stream` the same object is sent as an SSE event.
  * `BodyError` mirrors axum's extractor rejections, which happen before a handler runs and are
    answered in `text/plain` (`axum/src/extract/rejection.rs`, axum 0.7.9).
"""

from __future__ import annotations

from typing import ClassVar


class InferError(Exception):
    """Base of every error answered to a client: `str(e)` is the text, `status` the HTTP code."""

    status: int = 500
    error_type: str = "unknown"

    def __init__(self, message: str, *, status: int | None = None, error_type: str | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}


class ValidationError(InferError):
    """A request that breaks a validation rule; `detail` is TGI's inner `ValidationError` text."""

    status = 422
    error_type = "validation"

    def __init__(self, detail: str):
        super().__init__(f"Input validation error: {detail}")
        self.detail = detail


class GenerationError(InferError):
    """The shard failed while generating (`detail` is usually `Server error: <shard msg>`)."""

    status = 424
    error_type = "generation"

    def __init__(self, detail: str):
        super().__init__(f"Request failed during generation: {detail}")
        self.detail = detail


class OverloadedError(InferError):
    """No admission permit left (`max_concurrent_requests`); TGI never waits for one."""

    status = 429
    error_type = "overloaded"

    def __init__(self) -> None:
        super().__init__("Model is overloaded")


class TemplateError(InferError):
    """The chat template failed to render."""

    status = 422
    error_type = "template_error"

    def __init__(self, detail: object):
        super().__init__(f"Template error: {detail}")
        self.detail = str(detail)


class ToolError(InferError):
    """Bad `tools` / `tool_choice` on the chat route."""

    status = 422
    error_type = "tool_error"

    def __init__(self, detail: str):
        super().__init__(f"Tool error: {detail}")
        self.detail = detail


class BodyError(InferError):
    """A rejection before the handler runs; answered as `text/plain`, not JSON.

    Use the constructors: `json_syntax` (400), `json_data` (422), `missing_json_content_type`
    (415). A body over --payload-limit is answered 413 by aiohttp itself.
    """

    _TYPES: ClassVar[dict[int, str]] = {400: "json_syntax", 415: "content_type", 422: "json_data"}

    def __init__(self, status: int, text: str):
        super().__init__(text, status=status, error_type=self._TYPES.get(status, "body"))

    @classmethod
    def json_syntax(cls, detail: str) -> BodyError:
        return cls(400, f"Failed to parse the request body as JSON: {detail}")

    @classmethod
    def json_data(cls, detail: str) -> BodyError:
        return cls(422, f"Failed to deserialize the JSON body into the target type: {detail}")

    @classmethod
    def missing_json_content_type(cls) -> BodyError:
        return cls(415, "Expected request with `Content-Type: application/json`")
