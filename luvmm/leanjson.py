"""JSON for the restore path, without importing ``json`` (and with it ``re``).

The stdlib's json package costs ~15 ms to import on this project's machines,
inside a live update's blackout.  This module speaks the same JSON with the C
accelerators the json package itself uses (``_json.make_scanner``,
``_json.encode_basestring_ascii``); it covers what luvmm sends -- objects,
arrays, strings, integers, finite floats, booleans and null.
"""

from __future__ import annotations

import _json


class JSONError(ValueError):
    pass


class _Context:
    """What _json.make_scanner reads from a json.JSONDecoder."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name):
        raise JSONError(f"{name} is not JSON luvmm accepts")


_scan = _json.make_scanner(_Context())
_WS = " \t\n\r"


#: Deepest nesting accepted: luvmm's messages nest a few levels; the C
#: scanner recurses once per level.
MAX_DEPTH = 64


def loads(data: bytes | str):
    """JSON -> Python, or JSONError for any input that is not JSON luvmm
    speaks (bad UTF-8, nesting deeper than MAX_DEPTH, and what the C scanner
    gets wrong: an unterminated object raises SystemError from it)."""
    try:
        text = bytes(data).decode() if isinstance(data, (bytes, bytearray, memoryview)) else data
    except UnicodeDecodeError as e:
        raise JSONError(f"not UTF-8: {e}") from None
    if not isinstance(text, str):
        raise JSONError("JSON is text")
    _check_depth(text)
    start = len(text) - len(text.lstrip(_WS))
    try:
        obj, end = _scan(text, start)
    except StopIteration as e:
        raise JSONError(f"expecting a value at {e.value}") from None
    except (ValueError, SystemError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
        raise JSONError(str(e)[:200] or "malformed JSON") from None
    if text[end:].strip(_WS):
        raise JSONError(f"extra data at {end}")
    return obj


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH before the recursive scanner
    sees it.  Cheap where it matters: a text with few brackets is not
    scanned at all (brackets inside strings only ever over-count)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise JSONError(f"nested deeper than {MAX_DEPTH}")
        elif ch in "]}":
            depth -= 1


def dumps(obj, *, sort_keys: bool = False) -> str:
    parts: list[str] = []
    _encode(obj, parts, sort_keys)
    return "".join(parts)


def _encode(obj, out: list[str], sort_keys: bool) -> None:
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, str):
        out.append(_json.encode_basestring_ascii(obj))
    elif isinstance(obj, int):
        out.append(int.__repr__(obj))
    elif isinstance(obj, float):
        if obj != obj or obj in (float("inf"), float("-inf")):
            raise JSONError("NaN and infinities are not JSON")
        out.append(float.__repr__(obj))
    elif isinstance(obj, dict):
        out.append("{")
        items = sorted(obj.items()) if sort_keys else obj.items()
        for i, (key, value) in enumerate(items):
            if not isinstance(key, str):
                raise JSONError(f"object keys must be strings, not {type(key).__name__}")
            if i:
                out.append(",")
            out.append(_json.encode_basestring_ascii(key))
            out.append(":")
            _encode(value, out, sort_keys)
        out.append("}")
    elif isinstance(obj, (list, tuple)):
        out.append("[")
        for i, value in enumerate(obj):
            if i:
                out.append(",")
            _encode(value, out, sort_keys)
        out.append("]")
    else:
        raise JSONError(f"{type(obj).__name__} is not JSON serializable")
