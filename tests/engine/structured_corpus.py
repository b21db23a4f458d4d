"""JSON schemas the structured-output tests generate against: nested objects, arrays, enums, numbers with bounds,
required fields, strings with patterns, anyOf and $ref. Strings and arrays are bounded so that a random-weight
model (which loops on one token when greedy) still closes every document within the tests' token budget."""

from __future__ import annotations

from typing import Any

SCHEMAS: dict[str, dict[str, Any]] = {
    "required_fields": {
        "type": "object", "additionalProperties": False, "required": ["name", "age"],
        "properties": {"name": {"type": "string", "maxLength": 8},
                       "age": {"type": "integer", "minimum": 0, "maximum": 130}}},
    "nested_objects": {
        "type": "object", "additionalProperties": False, "required": ["user", "active"],
        "properties": {
            "active": {"type": "boolean"},
            "user": {"type": "object", "additionalProperties": False, "required": ["id", "address"],
                     "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                    "address": {"type": "object", "additionalProperties": False,
                                                "required": ["city"],
                                                "properties": {"city": {"type": "string", "maxLength": 6}}}}}}},
    "array_of_enums": {
        "type": "object", "additionalProperties": False, "required": ["colors"],
        "properties": {"colors": {"type": "array", "minItems": 1, "maxItems": 4,
                                  "items": {"enum": ["red", "green", "blue"]}}}},
    "bounded_numbers": {
        "type": "object", "additionalProperties": False, "required": ["ratio", "count", "temp"],
        "properties": {"ratio": {"type": "number", "minimum": 0, "maximum": 1},
                       "count": {"type": "integer", "minimum": 10, "maximum": 20},
                       "temp": {"type": "number", "exclusiveMinimum": -5, "exclusiveMaximum": 5}}},
    "string_patterns": {
        "type": "object", "additionalProperties": False, "required": ["sku", "zip"],
        "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
    "any_of_and_refs": {
        "$defs": {"point": {"type": "object", "additionalProperties": False, "required": ["x", "y"],
                            "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                           "y": {"type": "integer", "minimum": -9, "maximum": 9}}}},
        "type": "object", "additionalProperties": False, "required": ["shape"],
        "properties": {"shape": {"anyOf": [{"$ref": "#/$defs/point"},
                                           {"type": "array", "items": {"$ref": "#/$defs/point"}, "maxItems": 2},
                                           {"const": "none"}, {"type": "null"}]}}},
}
