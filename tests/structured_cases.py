"""The 20 JSON Schemas (with a prompt and a token budget each) used by the structured-output
tests and the bench's compile-time section: nested objects, arrays, enums, bounded numbers,
required/optional fields, $ref, anyOf, patterns, const, null unions."""

from __future__ import annotations


def obj(properties: dict, required: list[str] | None = None, **extra) -> dict:
    """A closed object schema (no additional properties); every property required by default."""
    return {"type": "object", "properties": properties, "additionalProperties": False,
            "required": list(properties) if required is None else required, **extra}


NAME = {"type": "string", "maxLength": 20}
SCHEMAS: list[tuple[str, str, dict, int]] = [   # (id, what to describe, schema, max_new_tokens)
    ("person", "a person called Bob", obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}}), 48),
    ("color", "the color of the sky", obj({"color": {"enum": ["red", "green", "blue"]}}), 24),
    ("int-array", "three lucky numbers", {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 100},
                                          "minItems": 2, "maxItems": 4}, 40),
    ("address", "a person and their address",
     obj({"name": NAME, "address": obj({"street": {"type": "string", "maxLength": 30}, "city": NAME,
                                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})}), 96),
    ("line-ref", "a line between two points",
     {"$defs": {"point": obj({"x": {"type": "integer", "minimum": -100, "maximum": 100},
                              "y": {"type": "integer", "minimum": -100, "maximum": 100}})},
      **obj({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}})}, 64),
    ("book-optional", "a book", obj({"title": {"type": "string", "maxLength": 30},
                                     "subtitle": {"type": "string", "maxLength": 20},
                                     "pages": {"type": "integer", "minimum": 1, "maximum": 2000}},
                                    required=["title"]), 72),
    ("flags", "a task's status", obj({"done": {"type": "boolean"}, "urgent": {"type": "boolean"}}), 24),
    ("price", "the price of a coffee", obj({"item": NAME, "price": {"type": "number", "minimum": 0, "maximum": 1000}}),
     64),
    ("rating", "a movie rating from 1 to 5", obj({"rating": {"enum": [1, 2, 3, 4, 5]}}), 20),
    ("order-items", "a shopping order", obj({"items": {"type": "array", "maxItems": 3, "minItems": 1,
                                                       "items": obj({"name": {"type": "string", "maxLength": 15},
                                                                     "qty": {"type": "integer", "minimum": 1,
                                                                             "maximum": 99}})}}), 96),
    ("const-version", "a status report", obj({"version": {"const": "1.0"}, "ok": {"type": "boolean"}}), 28),
    ("date-pattern", "today's date", obj({"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}), 32),
    ("any-of", "a value", obj({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 10},
                                                   {"type": "string", "maxLength": 10}]}}), 32),
    ("matrix", "a 2x2 matrix of digits",
     obj({"matrix": {"type": "array", "minItems": 2, "maxItems": 2,
                     "items": {"type": "array", "minItems": 2, "maxItems": 2,
                               "items": {"type": "integer", "minimum": 0, "maximum": 9}}}}), 48),
    ("sentiment", "the sentiment of 'I love it'", {"enum": ["positive", "negative", "neutral"]}, 12),
    ("code", "a three-letter airport code", obj({"code": {"type": "string", "minLength": 3, "maxLength": 3,
                                                          "pattern": "^[A-Z]+$"}}), 24),
    ("phones-ref", "home and work phone numbers",
     {"$defs": {"phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}},
      **obj({"home": {"$ref": "#/$defs/phone"}, "work": {"$ref": "#/$defs/phone"}})}, 48),
    ("nullable", "a person's middle name", obj({"middle_name": {"type": ["string", "null"], "maxLength": 10}}), 28),
    ("exclusive", "a count between 1 and 9", obj({"count": {"type": "integer", "exclusiveMinimum": 0,
                                                            "exclusiveMaximum": 10}}), 20),
    ("deep", "a nested setting", obj({"a": obj({"b": obj({"c": {"type": "boolean"}})})}), 40),
]
