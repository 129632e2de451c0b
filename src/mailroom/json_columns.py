"""JSON text for whole Arrow columns at once, byte for byte what ``json.dumps`` writes.

The envelope builder and the freezer write one small JSON object per recipient; building them
value by value in Python is most of their cost. Here a column of strings becomes a column of
JSON string literals (``json.dumps(value, ensure_ascii=False)``), and several such columns
become a column of compact JSON objects (``separators=(",", ":")``), with Arrow's string
kernels. Only values that need escaping (a quote, a backslash, a control character) go
through ``json.dumps`` itself, once per distinct value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

# What json.dumps(..., ensure_ascii=False) escapes: '"', '\\' and the C0 controls.
_NEEDS_ESCAPING = r'["\\\x00-\x1f]'


def json_strings(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``json.dumps(v, ensure_ascii=False)`` for every value of a string column (no nulls)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if values.null_count:
        raise ValueError(f"{values.null_count} null value(s) where text is required")
    values = values.cast(pa.string())
    quoted = pc.binary_join_element_wise('"', values, '"', "")
    escape = pc.match_substring_regex(values, _NEEDS_ESCAPING)
    if not pc.any(escape).as_py():
        return quoted
    encoded = pc.dictionary_encode(values)
    escaped = pa.array(
        [json.dumps(v, ensure_ascii=False) for v in encoded.dictionary.to_pylist()], pa.string()
    )
    return escaped.take(encoded.indices)


def json_objects(columns: Mapping[str, pa.Array | pa.ChunkedArray], length: int) -> pa.Array:
    """A compact JSON object per row: ``{"k1":v1,"k2":v2}`` with the keys in ``columns``' order
    and every value a string; ``length`` rows (for an empty mapping, ``{}`` each)."""
    return json_objects_of_literals({k: json_strings(v) for k, v in columns.items()}, length)


def json_objects_of_literals(literals: Mapping[str, pa.Array], length: int) -> pa.Array:
    """``json_objects`` from values already written as JSON (``json_strings``' output), so that
    the same values can make objects in several key orders at the cost of escaping them once."""
    if not literals:
        return pa.array(["{}"] * length, pa.string())
    parts: list[Any] = []
    separator = "{"
    for key, values in literals.items():
        parts += [separator + json.dumps(key, ensure_ascii=False) + ":", values]
        separator = ","
    parts.append("}")
    return concatenate(*parts)


def concatenate(*parts: Any) -> pa.Array:
    """Row-wise concatenation of string columns and constant strings (at least one column)."""
    joined = pc.binary_join_element_wise(*parts, "")
    return joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined
