"""Structured output for the OpenAI API: `response_format` and the `guided_*` extensions ->
the engine's Constraint (docs/structured-output.md, docs/openai.md).

    response_format {"type": "text"}                    free text (the default)
    response_format {"type": "json_object"}             any JSON object
    response_format {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}
    guided_json (schema object or JSON text), guided_regex, guided_choice (list of strings),
    guided_grammar (Lark)                               vLLM's older extension names
    structured_outputs {"json": schema | "regex": ... | "choice": [...] | "grammar": ... |
                        "json_object": true}             vLLM >= 0.12's name (one key set)

At most one of them per request (400 naming the second). `strict` is accepted either way: the
schema is always enforced. The constraint's content is checked by the engine (its validator
and the grammar compiler); their errors come back as 400 with param `response_format`.
"""

from __future__ import annotations

import json
from typing import Any

from ..engine.constraints.spec import Constraint
from .errors import ApiError, bad_request

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")
STRUCTURED_KEYS = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice",
                   "grammar": "guided_grammar"}


def structured_output(body: Any) -> Constraint | None:
    """The output constraint of a request (None = free text); 400 for a malformed one."""
    extras = body.extras()
    given = [name for name in ("response_format", *GUIDED) if extras.get(name) is not None]
    constraints = [(name, _from_response_format(extras[name]) if name == "response_format"
                    else _from_guided(name, extras[name])) for name in given]
    constraints = [(name, c) for name, c in constraints if c is not None]
    if len(constraints) > 1:
        raise bad_request(constraints[1][0], f"give one output constraint, not {constraints[0][0]} and "
                                             f"{constraints[1][0]}")
    return constraints[0][1] if constraints else None


def _from_response_format(value: Any) -> Constraint | None:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad_request("response_format", "response_format must be an object with a 'type'")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind != "json_schema":
        raise bad_request("response_format.type", f"must be 'text', 'json_object' or 'json_schema' (got {kind!r})")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise bad_request("response_format.json_schema", "json_schema must be an object with a 'schema' "
                                                         "(a JSON Schema object)")
    if "strict" in spec and not isinstance(spec["strict"], (bool, type(None))):
        raise bad_request("response_format.json_schema.strict", "strict must be a boolean")
    return Constraint("json_schema", json.dumps(spec["schema"]))


def _from_structured_outputs(value: Any) -> Constraint | None:
    if not isinstance(value, dict):
        raise bad_request("structured_outputs", "structured_outputs must be an object with one of "
                                                "json, regex, choice, grammar, json_object")
    given = [key for key, item in value.items() if item not in (None, False)]
    unknown = [key for key in given if key not in (*STRUCTURED_KEYS, "json_object")]
    if unknown:
        raise bad_request(f"structured_outputs.{unknown[0]}", f"structured_outputs.{unknown[0]} is not supported "
                                                              "(use json, regex, choice, grammar or json_object)")
    if len(given) > 1:
        raise bad_request("structured_outputs", f"give one of json, regex, choice, grammar, json_object "
                                                f"(got {', '.join(given)})")
    if not given:
        return None
    if given[0] == "json_object":
        return Constraint("json_object")
    try:
        return _from_guided(STRUCTURED_KEYS[given[0]], value[given[0]])
    except ApiError as error:
        raise bad_request(f"structured_outputs.{given[0]}",
                          error.message.replace(STRUCTURED_KEYS[given[0]], f"structured_outputs.{given[0]}")) from None


def _from_guided(name: str, value: Any) -> Constraint | None:
    if name == "structured_outputs":
        return _from_structured_outputs(value)
    if name == "guided_json":
        if isinstance(value, str):
            return Constraint("json_schema", value)
        if isinstance(value, dict):
            return Constraint("json_schema", json.dumps(value))
        raise bad_request(name, "guided_json must be a JSON Schema (object or JSON text)")
    if name == "guided_choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise bad_request(name, "guided_choice must be a list of strings")
        return Constraint("choice", choices=tuple(value))
    if not isinstance(value, str):
        raise bad_request(name, f"{name} must be a string")
    return Constraint("regex" if name == "guided_regex" else "grammar", value)
