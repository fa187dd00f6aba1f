"""Checks on the JSON Schemas that plugins publish for their parameters."""
from __future__ import annotations

import functools
from typing import Any

from squeezelang.errors import PluginError


def check_param_schema(schema: dict[str, Any]) -> None:
    """Raise ``PluginError`` unless ``schema`` is a valid object schema that forbids unknown keys."""
    from jsonschema.exceptions import best_match

    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise PluginError("its parameter schema must be a JSON Schema of type 'object'")
    if schema.get("additionalProperties") is not False:
        raise PluginError("its parameter schema must set additionalProperties: false, "
                          "so that a misspelt key is an error rather than silently ignored")
    error = best_match(_metaschema_validator().iter_errors(schema))
    if error is not None:
        raise PluginError(f"its parameter schema is not valid JSON Schema: {error.message}")


def schema_defaults(schema: dict[str, Any]) -> dict[str, Any]:
    """The ``default`` of every property that declares one."""
    return {k: v["default"] for k, v in schema.get("properties", {}).items()
            if isinstance(v, dict) and "default" in v}


# ---------------------------------------------------------------- the metaschema, flattened
# Every plugin's schemas are checked against the draft 2020-12 metaschema when it registers, on
# every start of the command line. That metaschema is an ``allOf`` of seven vocabulary schemas whose
# subschemas refer back through ``$dynamicRef: "#meta"``, so jsonschema walks seven schemas and
# resolves a dynamic reference for every node of the schema it checks: most of what ``squeeze
# check`` spends on plugins. The vocabularies only list disjoint ``properties`` of the same
# ``type``, and ``#meta`` always resolves to the metaschema itself (the outermost schema in the
# dynamic scope that declares that anchor), so one schema with the union of their properties and
# ``$defs``, and ``$ref: "#"`` for ``$dynamicRef: "#meta"``, accepts exactly the same schemas about
# five times faster. Anything of another shape (another jsonschema release) is checked with
# jsonschema's own metaschema instead.

_SHELL = {"$schema", "$id", "$vocabulary", "$dynamicAnchor", "title", "$comment", "type", "properties",
          "$defs"}
_MAPS = {"properties", "patternProperties", "dependentSchemas", "$defs", "definitions"}
_ONE = {"additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames",
        "unevaluatedItems", "unevaluatedProperties", "contentSchema"}
_MANY = {"allOf", "anyOf", "oneOf", "prefixItems"}
#: Keywords whose values hold no subschema (so no reference to rewrite).
_PLAIN = {"type", "enum", "const", "default", "format", "pattern", "minimum", "maximum",
          "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "minItems",
          "maxItems", "uniqueItems", "minContains", "maxContains", "minProperties", "maxProperties",
          "required", "dependentRequired", "deprecated", "readOnly", "writeOnly", "title",
          "description", "examples", "$comment", "contentEncoding", "contentMediaType"}


@functools.lru_cache(maxsize=1)
def _metaschema_validator() -> Any:
    """A draft 2020-12 validator of JSON Schemas (with format checks, as ``check_schema``)."""
    import jsonschema

    cls = jsonschema.Draft202012Validator
    try:
        flat = flattened_metaschema()
    except Exception:  # another jsonschema release, another shape: the metaschema as it comes
        return cls(cls.META_SCHEMA, format_checker=cls.FORMAT_CHECKER)
    return cls(flat, format_checker=cls.FORMAT_CHECKER)


def flattened_metaschema() -> dict[str, Any]:
    """The draft 2020-12 metaschema as one schema without ``allOf`` or ``$dynamicRef`` (see above);
    ``ValueError`` if jsonschema's copy is not of the shape this relies on."""
    from urllib.parse import urljoin

    import jsonschema
    from jsonschema_specifications import REGISTRY

    meta = jsonschema.Draft202012Validator.META_SCHEMA
    root = meta["$id"]
    if set(meta) - _SHELL - {"allOf"} or not all(set(r) == {"$ref"} for r in meta.get("allOf", ())):
        raise ValueError("the metaschema is not an allOf of vocabulary references")
    vocabularies = [urljoin(root, r["$ref"]) for r in meta["allOf"]]
    schemas = [(REGISTRY.contents(uri), uri) for uri in vocabularies]
    schemas.append(({k: v for k, v in meta.items() if k != "allOf"}, root))
    known = {uri for _, uri in schemas}

    def local(ref: str, base: str) -> str:
        uri, _, fragment = urljoin(base, ref).partition("#")
        if uri not in known or not fragment.startswith("/$defs/") or fragment.count("/") != 2:
            raise ValueError(f"unexpected $ref {ref!r} in {base}")
        return "#" + fragment

    def flat(node: Any, base: str) -> Any:
        if not isinstance(node, dict):
            return node
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "$dynamicRef":
                if value != "#meta":
                    raise ValueError(f"unexpected $dynamicRef {value!r} in {base}")
                out["$ref"] = "#"
            elif key == "$ref":
                out[key] = local(value, base)
            elif key in _MAPS:
                out[key] = {name: flat(sub, base) for name, sub in value.items()}
            elif key in _ONE:
                out[key] = flat(value, base)
            elif key in _MANY:
                out[key] = [flat(sub, base) for sub in value]
            elif key in _PLAIN:
                out[key] = value
            else:
                raise ValueError(f"unexpected keyword {key!r} in {base}")
        return out

    properties: dict[str, Any] = {}
    defs: dict[str, Any] = {}
    for schema, base in schemas:
        if set(schema) - _SHELL or schema.get("type") != meta.get("type") \
                or schema.get("$dynamicAnchor") != "meta":
            raise ValueError(f"{base} is not a vocabulary of properties")
        for into, key in ((properties, "properties"), (defs, "$defs")):
            for name, sub in schema.get(key, {}).items():
                if name in into:
                    raise ValueError(f"{key} '{name}' is defined twice")
                into[name] = flat(sub, base)
    return {"$schema": meta["$schema"], "type": meta["type"], "properties": properties, "$defs": defs}
