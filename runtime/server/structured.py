"""The request fields that constrain an answer's shape, mapped to one ``StructuredOutputsParams``.

Where a client can ask for a grammar (exactly one of them per request, else a 400 naming the second)::

    response_format: {"type": "json_object"}                              OpenAI
    response_format: {"type": "json_schema", "json_schema": {"schema", "strict"}}
    structured_outputs: {"json" | "regex" | "choice" | "grammar" | "json_object"}    vLLM, via extra_body
    guided_json | guided_regex | guided_choice | guided_grammar                     vLLM's older names

JSON is always emitted compact (one line, ``", "`` and ``": "``), which satisfies vLLM's
``disable_any_whitespace`` either way. ``Constraint.param`` is the request field the constraint came from, so
that a schema the grammar compiler rejects is a 400 naming that field, with the compiler's message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..structured_outputs import GrammarError, StructuredOutputsParams
from . import protocol as p
from .errors import bad_request


@dataclass(frozen=True)
class Constraint:
    params: StructuredOutputsParams
    param: str  # the request field, for errors: "response_format.json_schema.schema", "guided_regex", ...


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _candidates(req: p.CompletionRequest | p.ChatCompletionRequest) -> list[tuple[str, dict[str, Any]]]:
    """(request field, StructuredOutputsParams kwargs) for every constraint the request sets."""
    found: list[tuple[str, dict[str, Any]]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", {"json_object": True, "strict": False}))
    elif rf is not None and rf.type == "json_schema":
        js = rf.json_schema
        if js is None or js.schema_ is None:
            raise bad_request(
                "response_format type 'json_schema' needs json_schema.schema", param="response_format.json_schema"
            )
        found.append(("response_format.json_schema.schema", {"json": js.schema_, "strict": bool(js.strict)}))
    so = req.structured_outputs
    if so is not None:
        for name in ("whitespace_pattern", "structural_tag"):
            if getattr(so, name) is not None:
                raise bad_request(f"structured_outputs.{name} is not supported", param=f"structured_outputs.{name}")
        kinds = {
            "json": so.json_,
            "regex": so.regex,
            "choice": so.choice,
            "grammar": so.grammar,
            "json_object": so.json_object or None,
        }
        chosen = [k for k, v in kinds.items() if v is not None]
        if len(chosen) != 1:
            raise bad_request(
                "structured_outputs must set exactly one of json, regex, choice, grammar, json_object",
                param="structured_outputs",
            )
        kind = chosen[0]
        kwargs: dict[str, Any] = {kind: kinds[kind]}
        if kind == "json":
            kwargs["strict"] = not so.disable_additional_properties
        found.append((f"structured_outputs.{kind}", kwargs))
    for field_name, kind in _GUIDED.items():
        value = getattr(req, field_name)
        if value is not None:
            found.append((field_name, {kind: value}))
    if req.guided_whitespace_pattern is not None:
        raise bad_request("guided_whitespace_pattern is not supported", param="guided_whitespace_pattern")
    return found


def constraint_of(req: p.CompletionRequest | p.ChatCompletionRequest) -> Constraint | None:
    """The request's one output constraint, or None; two of them (or a malformed one) is a 400."""
    found = _candidates(req)
    if not found:
        return None
    if len(found) > 1:
        raise bad_request(
            f"{found[1][0]} cannot be combined with {found[0][0]}: a request takes one output constraint",
            param=found[1][0],
        )
    param, kwargs = found[0]
    try:
        return Constraint(StructuredOutputsParams(**kwargs), param)
    except GrammarError as exc:
        raise bad_request(exc.message, param=param) from None
