"""JSON Schema features xgrammar 0.2.8 does not enforce: a schema using one is rejected, never silently relaxed;
and one rewrite around an xgrammar bug (:func:`bounded_strings_as_patterns`).

Found by compiling each keyword with and without it and comparing xgrammar's EBNF (an unchanged grammar means the
keyword was ignored; ``allOf`` with several members and a non-local ``$ref`` even compile to "any JSON value").
Annotations (``title``, ``description``, ``default``, ``examples``, ``deprecated``, unknown ``format`` values) do
not constrain a value and are accepted, as JSON Schema validators treat them.
"""

from __future__ import annotations

from typing import Any

# keyword -> why it is refused
_UNSUPPORTED = {
    "not": "'not' is not supported by the grammar engine",
    "if": "'if'/'then'/'else' are not supported by the grammar engine",
    "then": "'if'/'then'/'else' are not supported by the grammar engine",
    "else": "'if'/'then'/'else' are not supported by the grammar engine",
    "contains": "'contains' is not supported by the grammar engine",
    "minContains": "'minContains' is not supported by the grammar engine",
    "maxContains": "'maxContains' is not supported by the grammar engine",
    "propertyNames": "'propertyNames' is not supported by the grammar engine",
    "dependentRequired": "'dependentRequired' is not supported by the grammar engine",
    "dependentSchemas": "'dependentSchemas' is not supported by the grammar engine",
    "dependencies": "'dependencies' is not supported by the grammar engine",
    "$dynamicRef": "'$dynamicRef' is not supported by the grammar engine",
    "$recursiveRef": "'$recursiveRef' is not supported by the grammar engine",
}
# keywords whose value maps names to subschemas
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
# keywords whose value is one subschema or a list of them
_SCHEMA_VALUES = (
    "items", "prefixItems", "additionalProperties", "unevaluatedProperties", "unevaluatedItems", "anyOf", "oneOf",
    "allOf", "additionalItems",
)  # fmt: skip


def unsupported_schema_feature(schema: Any, path: str = "#") -> str | None:
    """The first feature of ``schema`` the engine cannot enforce, as "<json pointer>: <why>", or None."""
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            if (found := unsupported_schema_feature(item, f"{path}/{i}")) is not None:
                return found
        return None
    if not isinstance(schema, dict):
        return None
    for keyword, why in _UNSUPPORTED.items():
        if keyword in schema:
            return f"{path}/{keyword}: {why}"
    if schema.get("uniqueItems") is True:
        return f"{path}/uniqueItems: 'uniqueItems' is not supported by the grammar engine"
    all_of = schema.get("allOf")
    if isinstance(all_of, list) and len(all_of) > 1:
        return f"{path}/allOf: 'allOf' with more than one member is not supported by the grammar engine"
    ref = schema.get("$ref")
    if isinstance(ref, str) and not (ref == "#" or ref.startswith("#/")):
        return f"{path}/$ref: only local references ('#/...') are supported, got {ref!r}"
    if _has_length_bound(schema):
        for keyword in ("pattern", "format"):
            if keyword in schema:
                return (
                    f"{path}/{keyword}: '{keyword}' combined with 'minLength'/'maxLength' is not supported by the "
                    "grammar engine"
                )
    multiple_of = schema.get("multipleOf")
    if multiple_of is not None and not (schema.get("type") == "integer" and _is_int(multiple_of)):
        return f"{path}/multipleOf: 'multipleOf' is supported only as an integer on an integer type"
    for keyword in _SCHEMA_MAPS:
        mapping = schema.get(keyword)
        if isinstance(mapping, dict):
            for name, sub in mapping.items():
                if (found := unsupported_schema_feature(sub, f"{path}/{keyword}/{name}")) is not None:
                    return found
    for keyword in _SCHEMA_VALUES:
        if keyword in schema and (found := unsupported_schema_feature(schema[keyword], f"{path}/{keyword}")):
            return found
    return None


def bounded_strings_as_patterns(schema: Any) -> Any:
    """``schema`` with each ``minLength``/``maxLength`` string rewritten as the same bound on a ``pattern``.

    xgrammar 0.2.8 lowers a length-bounded string to a bare character class that admits raw control characters
    (U+0000-U+001F), which RFC 8259 forbids in a JSON string, so the "JSON" it generates can fail ``json.loads``
    (mlc-ai/xgrammar#800). Its pattern path is JSON-string aware. The pattern admits no escape sequence, so a bounded
    string never holds a quote or a backslash: a subset of the schema's values, never a superset.
    """
    if isinstance(schema, list):
        return [bounded_strings_as_patterns(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for keyword, value in schema.items():
        if keyword in _SCHEMA_MAPS and isinstance(value, dict):
            out[keyword] = {name: bounded_strings_as_patterns(sub) for name, sub in value.items()}
        elif keyword in _SCHEMA_VALUES:
            out[keyword] = bounded_strings_as_patterns(value)
        else:
            out[keyword] = value
    if _has_length_bound(out) and "pattern" not in out and "format" not in out:
        low, high = out.pop("minLength", 0), out.pop("maxLength", None)
        out["pattern"] = f"^[\\s\\S]{{{low},{'' if high is None else high}}}$"
    return out


def _has_length_bound(schema: dict[str, Any]) -> bool:
    return "minLength" in schema or "maxLength" in schema


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
