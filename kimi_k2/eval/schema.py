"""A small JSON-Schema checker for tool arguments: the subset that OpenAI function `parameters` use.

Supported keywords: type (object, string, number, integer, boolean, array), properties, required,
additionalProperties (false), enum, minimum, maximum, pattern, items. Anything else in a schema is an error, so a tool
schema can never silently use a keyword that is not checked.
"""

from __future__ import annotations

import re
from typing import Any

KEYWORDS = {"type", "properties", "required", "additionalProperties", "enum", "minimum", "maximum", "pattern", "items",
            "description", "default"}
TYPES = {
    "object": lambda v: isinstance(v, dict),
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
}


def errors(value: Any, schema: dict, path: str = "$") -> list[str]:
    """Every way `value` breaks `schema`, as 'path: problem' strings; [] when it is valid."""
    unknown = set(schema) - KEYWORDS
    if unknown:
        raise ValueError(f"{path}: unsupported schema keywords {sorted(unknown)}")
    kind = schema.get("type")
    if kind is not None:
        if kind not in TYPES:
            raise ValueError(f"{path}: unsupported schema type {kind!r}")
        if not TYPES[kind](value):
            return [f"{path}: expected {kind}, got {type(value).__name__}"]
    out: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        out.append(f"{path}: {value} < minimum {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        out.append(f"{path}: {value} > maximum {schema['maximum']}")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        out.append(f"{path}: {value!r} does not match {schema['pattern']!r}")
    if kind == "array" and "items" in schema:
        for i, item in enumerate(value):
            out += errors(item, schema["items"], f"{path}[{i}]")
    if kind == "object":
        props = schema.get("properties", {})
        out += [f"{path}: missing required {k!r}" for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties") is False:
            out += [f"{path}: unexpected property {k!r}" for k in value if k not in props]
        for k, v in value.items():
            if k in props:
                out += errors(v, props[k], f"{path}.{k}")
    return out


def with_defaults(args: dict, schema: dict) -> dict:
    """`args` plus the schema's `default` for every absent property that has one."""
    full = {k: p["default"] for k, p in schema.get("properties", {}).items() if "default" in p}
    return full | args


def object_schema(required: list[str], **properties: dict) -> dict:
    """The `parameters` schema of a tool: an object of `properties`, `required` ones, nothing else allowed."""
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
