"""Strict JSON request bodies: JSON text -> Python value, as serde_json would parse it.

TGI-compatible (`router/src/lib.rs`): rejects what serde_json rejects and Python's `json`
accepts (NaN/Infinity, lone surrogates, invalid UTF-8) and nesting deeper than 64 levels.
Errors are `BodyError(400)`.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

from router.errors import BodyError

__all__ = ["MAX_JSON_DEPTH", "loads_strict"]

MAX_JSON_DEPTH = 64

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEP = [0] * 256
_BRACKET_STEP[ord("[")] = _BRACKET_STEP[ord("{")] = 1
_BRACKET_STEP[ord("]")] = _BRACKET_STEP[ord("}")] = -1


def loads_strict(data: bytes | bytearray | memoryview | str) -> Any:
    """Parses a request body like serde_json would; raises `BodyError(400)` on anything else."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    text = _decode_utf8(raw)
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise BodyError.json_syntax(f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise BodyError.json_syntax("recursion limit exceeded") from None
    except ValueError:  # an integer longer than sys.get_int_max_str_digits()
        raise BodyError.json_syntax("number out of range") from None
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _is_too_deep(raw):
        raise BodyError.json_syntax(
            f"recursion limit exceeded (more than {MAX_JSON_DEPTH} nested levels)"
        )
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise BodyError.json_syntax("lone surrogate in hex escape")
    return value


def _decode_utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - raw.rfind(b"\n", 0, e.start)
        raise BodyError.json_syntax(
            f"invalid unicode code point at line {line} column {column}"
        ) from None


def _reject_constant(name: str) -> Any:
    raise BodyError.json_syntax(f"expected value: `{name}` is not valid JSON")


def _is_too_deep(raw: bytes) -> bool:
    """Nesting depth > MAX_JSON_DEPTH, for valid JSON: the maximum running sum over the bracket
    skeleton (strings removed), computed in C (no Python bytecode per character)."""
    skeleton = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    return max(accumulate(map(_BRACKET_STEP.__getitem__, skeleton)), default=0) > MAX_JSON_DEPTH


def _has_lone_surrogate(value: Any) -> bool:
    """Python's `json` joins valid surrogate pairs, so a surrogate left anywhere is lone."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
