"""The flattened metaschema that checks plugin schemas accepts exactly what jsonschema's own does."""
from __future__ import annotations

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from squeezelang.errors import PluginError
from squeezelang.hooks.manager import build_registries, plugin_manager
from squeezelang.hooks.schema import _metaschema_validator, check_param_schema, flattened_metaschema

META = jsonschema.Draft202012Validator.META_SCHEMA
REFERENCE = jsonschema.Draft202012Validator(
    META, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)

BAD = [
    {"properties": {"x": {"type": "nope"}}},
    {"properties": {"x": {"items": [1]}}},
    {"properties": {"x": {"minimum": "a"}}},
    {"properties": {"x": {"pattern": "(("}}},
    {"properties": {"x": {"enum": 3}}},
    {"required": "x"},
    {"properties": {"x": {"anyOf": []}}},
    {"$defs": {"a": 3}},
    {"properties": {"x": {"$ref": 3}}},
    {"properties": {"x": {"properties": {"y": {"additionalProperties": {"type": 5}}}}}},
    {"dependencies": {"a": 5}},
    {"definitions": {"a": 5}},
    {"properties": {"x": {"maxLength": -1}}},
    {"properties": {"x": {"$id": "a#b"}}},
    {"properties": {"x": {"$anchor": "1a"}}},
    {"properties": {"x": {"dependentRequired": {"a": [1]}}}},
    {"properties": {"x": {"type": ["string", "string"]}}},
    {"properties": {"x": {"contentSchema": 4}}},
    {"properties": {"x": {"unevaluatedItems": 3}}},
    {"properties": {"x": {"deprecated": 1}}},
    {"properties": {"x": {"format": 2}}},
    {"properties": {"x": {"required": ["a", "a"]}}},
    {"properties": {"x": {"prefixItems": [{"type": "nope"}]}}},
    {"properties": {"x": {"if": {"const": 1}, "then": {"minItems": -2}}}},
    {"patternProperties": {"^a": {"maximum": "high"}}},
    {"properties": {"x": {"$vocabulary": {"https://example.com/v": "yes"}}}},
]
GOOD = [
    {},
    {"properties": {"x": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5}}},
    {"properties": {"x": {"type": "array", "items": {"type": "string"}, "minItems": 1}}},
    {"properties": {"x": {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/n"}]}},
     "$defs": {"n": {"type": "integer"}}},
    {"properties": {"x": {"pattern": "^[a-z]+$", "format": "anything"}}},
    {"properties": {"x": {"if": {"const": 1}, "then": {"minItems": 2}, "else": False}}},
]


def builtin_schemas() -> list[dict]:
    regs = build_registries(plugin_manager())
    return [item.schema for registry in regs.by_hook().values() for item in registry
            if isinstance(getattr(item, "schema", None), dict)]


def verdict(validator, schema) -> tuple[bool, set[str]]:
    messages = {e.message for e in validator.iter_errors(schema)}
    return not messages, messages


def test_the_installed_jsonschema_gets_the_flattened_metaschema():
    flat = flattened_metaschema()
    assert "allOf" not in flat and "$dynamicRef" not in str(flat["$defs"])
    assert _metaschema_validator().schema == flat


@pytest.mark.parametrize("schema", builtin_schemas() + [{"type": "object", "additionalProperties": False, **s}
                                                        for s in GOOD + BAD])
def test_same_verdict_and_message_as_jsonschema(schema):
    ok, messages = verdict(_metaschema_validator(), schema)
    expected_ok, expected = verdict(REFERENCE, schema)
    assert ok == expected_ok
    assert messages <= expected  # the same errors, each reported once rather than once per vocabulary


def test_a_bad_schema_is_refused_with_the_reason():
    with pytest.raises(PluginError, match="not valid JSON Schema: 'nope' is not valid"):
        check_param_schema({"type": "object", "additionalProperties": False,
                            "properties": {"x": {"type": "nope"}}})


KEYWORDS = sorted(flattened_metaschema()["properties"])
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.sampled_from(
        ["string", "number", "integer", "object", "array", "nope", "#", "#/$defs/a", "a#b", "((", "^x"]),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(KEYWORDS + ["a", "x"]), children, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYWORDS), VALUES, max_size=5))
def test_random_schemas_get_the_same_verdict(schema):
    try:
        expected_ok, expected = verdict(REFERENCE, schema)
    except Exception:  # e.g. a $ref jsonschema itself cannot resolve: nothing to compare
        return
    ok, messages = verdict(_metaschema_validator(), schema)
    assert ok == expected_ok, (messages, expected)
