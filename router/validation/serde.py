"""serde-style typing of JSON values: converters that check a value's type and range and raise
`BodyError(422)` with serde's wording (`{path}: invalid type: ..., expected ...`).

Shared by the TGI request parser (`router/validation.py`) and the OpenAI-compatible routes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from typing import Any

from router.errors import BodyError

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
I32_MIN, I32_MAX = -(2**31), 2**31 - 1
F32_MAX = 3.4028234663852886e38

Converter = Callable[[Any, str], Any]


def describe(value: Any) -> str:
    """serde's `Unexpected` wording for a JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        digits = str(value)
        return f"integer `{digits if len(digits) <= 40 else digits[:37] + '...'}`"
    if isinstance(value, float):
        return f"floating point `{value!r}`"
    if isinstance(value, str):
        quoted = json.dumps(value if len(value) <= 64 else value[:61] + "...", ensure_ascii=False)
        return f"string {quoted}"
    return "sequence" if isinstance(value, list) else "map"


def invalid_type(path: str, value: Any, expected: str) -> BodyError:
    return BodyError.json_data(f"{path}: invalid type: {describe(value)}, expected {expected}")


def invalid_value(path: str, value: Any, expected: str) -> BodyError:
    return BodyError.json_data(f"{path}: invalid value: {describe(value)}, expected {expected}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(rust_type: str, minimum: int, maximum: int) -> Converter:
    def convert(value: Any, path: str) -> int:
        if not is_int(value):
            raise invalid_type(path, value, rust_type)
        if not minimum <= value <= maximum:
            raise invalid_value(path, value, rust_type)
        return value

    return convert


def f32(value: Any, path: str) -> float:
    """A finite number, rounded to f32 (TGI's comparisons such as `top_p < 1.0` are on f32)."""
    if not (is_int(value) or isinstance(value, float)):
        raise invalid_type(path, value, "f32")
    if abs(value) > F32_MAX or not math.isfinite(value):
        raise invalid_value(path, value, "a finite f32")
    return struct.unpack("f", struct.pack("f", float(value)))[0]


def boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise invalid_type(path, value, "a boolean")
    return value


def string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise invalid_type(path, value, "a string")
    return value


def string_list(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise invalid_type(path, value, "a sequence")
    return tuple(string(item, f"{path}[{i}]") for i, item in enumerate(value))


def optional(convert: Converter) -> Converter:
    return lambda value, path: None if value is None else convert(value, path)
