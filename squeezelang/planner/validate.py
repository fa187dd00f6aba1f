"""Check plugin parameters against their JSON Schemas, with errors placed on the offending key."""
from __future__ import annotations

from collections.abc import Collection
from typing import Any

from squeezelang.errors import RecipeError
from squeezelang.lang import ast
from squeezelang.lang.diagnostics import did_you_mean


def _describe_bounds(prop: dict[str, Any]) -> str | None:
    lo = prop.get("minimum", prop.get("exclusiveMinimum"))
    hi = prop.get("maximum", prop.get("exclusiveMaximum"))
    if lo is not None and hi is not None:
        return f"between {lo:g} and {hi:g}"
    if lo is not None:
        return f"at least {lo:g}" if "minimum" in prop else f"greater than {lo:g}"
    if hi is not None:
        return f"at most {hi:g}" if "maximum" in prop else f"less than {hi:g}"
    return None


_TYPE_WORDS = {"integer": "an integer", "number": "a number", "string": "a string",
               "boolean": "true or false", "array": "a list", "object": "a block"}


def _type_words(t: Any) -> str:
    if isinstance(t, list):
        return " or ".join(_TYPE_WORDS.get(x, x) for x in t)
    return _TYPE_WORDS.get(t, str(t))


def _message(error: Any, key: str | None, owner: str) -> tuple[str, str | None]:
    """A readable message (and hint) for one jsonschema ValidationError."""
    v = error.validator
    prop = error.schema if isinstance(error.schema, dict) else {}
    name = f"'{key}'" if key else owner
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return f"{name} must be {_describe_bounds(prop)}", None
    if v == "type":
        return f"{name} must be {_type_words(error.validator_value)}", None
    if v == "enum":
        options = ", ".join(repr(o) if not isinstance(o, str) else f'"{o}"' for o in error.validator_value)
        hint = did_you_mean(str(error.instance), [str(o) for o in error.validator_value]).strip(" —")
        return f"{name} must be one of {options}", (hint or None)
    if v in ("minItems", "maxItems"):
        return f"{name} must have {'at least' if v == 'minItems' else 'at most'} {error.validator_value} item(s)", None
    if v == "required":
        return f"{owner} needs {error.message.split(' is a required')[0]}", None
    if v in ("oneOf", "anyOf"):
        return f"{name} {prop.get('description') or 'has an invalid value'}".rstrip(), None
    if v == "minLength":
        return f"{name} must not be empty", None
    return f"{name}: {error.message}", None


def schema_errors(schema: dict[str, Any], values: dict[str, Any], owner: str,
                  spans: dict[str, tuple[ast.Span, ast.Span]], fallback: ast.Span | None,
                  failed: Collection[str] = ()) -> list[RecipeError]:
    """Validate ``values`` against ``schema``; each error sits on the key it concerns.

    ``spans`` maps a key to (key span, value span); unknown keys point at the key, bad values at the
    value, and missing keys at ``fallback`` (the statement). ``failed`` names keys the recipe gives
    but whose values were rejected (and reported) before: they are left out of ``values``, and not
    reported again as missing, so their errors and those of the other keys come out together.
    """
    import jsonschema

    props = schema.get("properties", {})
    errors: list[RecipeError] = []
    for key in values:
        if key not in props and schema.get("additionalProperties") is False:
            span = spans.get(key, (fallback, fallback))[0]
            hint = did_you_mean(key, list(props)).strip(" —") or (
                f"known parameters: {', '.join(sorted(props))}" if props else None)
            errors.append(RecipeError(f"unknown parameter '{key}' for {owner}", span, hint=hint))
    known = {k: v for k, v in values.items() if k in props}
    validator = jsonschema.Draft202012Validator({**schema, "additionalProperties": True})
    for error in sorted(validator.iter_errors(known), key=lambda e: list(e.path)):
        if error.validator == "required" and _missing(error) in failed:
            continue
        key = str(error.path[0]) if error.path else None
        span = spans[key][1] if key in spans else fallback
        message, hint = _message(error, key, owner)
        if not hint and isinstance(props.get(key), dict) and props[key].get("description"):
            hint = props[key]["description"]
        errors.append(RecipeError(message, span, hint=hint))
    return errors


def _missing(error: Any) -> str | None:
    """The property a ``required`` error says is missing."""
    return next((k for k in error.validator_value
                 if isinstance(error.instance, dict) and k not in error.instance
                 and error.message.startswith(repr(k))), None)


def parse_columns(spec: str) -> list[list[list[str]]]:
    """``"text|a,b;label"`` -> groups (all required) of alternatives (any one) of column sets."""
    groups = []
    for group in filter(None, (g.strip() for g in spec.split(";"))):
        groups.append([[c.strip() for c in alt.split(",") if c.strip()] for alt in group.split("|")])
    return groups


def missing_columns(spec: str, renames: dict[str, str], available: list[str]) -> list[str]:
    """The first alternative's missing columns of every group that no alternative satisfies."""
    missing: list[str] = []
    for alternatives in parse_columns(spec):
        options = [[renames.get(c, c) for c in alt] for alt in alternatives]
        if not any(all(c in available for c in opt) for opt in options):
            best = min(options, key=lambda opt: sum(c not in available for c in opt))
            missing.extend(c for c in best if c not in available)
    return missing
