"""Checks on the JSON Schemas that plugins publish for their parameters."""
from __future__ import annotations

from typing import Any

from squeezelang.errors import PluginError


def check_param_schema(schema: dict[str, Any]) -> None:
    """Raise ``PluginError`` unless ``schema`` is a valid object schema that forbids unknown keys."""
    import jsonschema

    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise PluginError("its parameter schema must be a JSON Schema of type 'object'")
    if schema.get("additionalProperties") is not False:
        raise PluginError("its parameter schema must set additionalProperties: false, "
                          "so that a misspelt key is an error rather than silently ignored")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise PluginError(f"its parameter schema is not valid JSON Schema: {exc.message}") from None


def schema_defaults(schema: dict[str, Any]) -> dict[str, Any]:
    """The ``default`` of every property that declares one."""
    return {k: v["default"] for k, v in schema.get("properties", {}).items()
            if isinstance(v, dict) and "default" in v}
