"""`response_format` -> a GBNF grammar the engine enforces token by token.

`{"type": "json_object"}` gets a grammar for any JSON object; `{"type": "json_schema", ...}` gets
llama.cpp's JSON-schema-to-GBNF conversion (shipped with llama-cpp-python). The converter silently
skips keywords it does not know, which would let output through that does not validate, so a schema
is first checked against the keywords it does express; anything else is a 400 naming the keyword.
Sizes are bounded: the schema's JSON, its nesting, and the repetition counts the converter unrolls.
"""

from __future__ import annotations

import json
import re
from typing import Any

from deepseek_serve.serving.failures import ApiError

MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32
MAX_REPEAT = 256  # minItems/maxItems/minLength/maxLength: the grammar spells such counts out

# keywords that constrain output and that the converter turns into grammar rules
_CONSTRAINING = {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "pattern",
    "format",
    "minLength",
    "maxLength",
}
# keywords that only describe or hold definitions
_ANNOTATIONS = {
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$defs",
    "definitions",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
    "strict",
    "nullable",
}
_FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
_COUNTS = ("minItems", "maxItems", "minLength", "maxLength")
# JSON strings hold no raw control characters; the converter's `char` rule lets them through
_CHAR_RULE = re.compile(r"^char ::= .*$", re.MULTILINE)
_JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'


class _Checker:
    """Walks a schema; errors name `label` + the JSON path and carry `param`."""

    def __init__(self, label: str, param: str) -> None:
        self.label = label
        self.param = param

    def bad(self, path: str, why: str) -> ApiError:
        return ApiError(400, f"{self.label}{path}: {why}", "invalid_request_error", self.param, "invalid_value")

    def unsupported(self, path: str, what: str) -> ApiError:
        return ApiError(
            400,
            f"{self.label}{path}: {what} is not supported by this server's constrained decoding, so the "
            "output could not be guaranteed to validate.",
            "invalid_request_error",
            self.param,
            "unsupported_value",
        )

    def check(self, schema: Any, path: str = "", depth: int = 0) -> None:
        if depth > MAX_SCHEMA_DEPTH:
            raise self.bad(path, f"nested deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(schema, bool):
            if not schema:
                raise self.unsupported(path, "the schema `false`")
            return
        if not isinstance(schema, dict):
            raise self.bad(path, "a schema must be an object")
        for key, value in schema.items():
            self._keyword(key, value, f"{path}.{key}", depth)
        if schema.get("type") == "object" or "properties" in schema:
            props = schema.get("properties") or {}
            missing = [r for r in schema.get("required", []) if r not in props]
            if missing and schema.get("additionalProperties") is False:
                raise self.bad(path, f"required {missing[0]!r} is not a property")

    def _keyword(self, key: str, value: Any, where: str, depth: int) -> None:
        if key in _ANNOTATIONS:
            if key in ("$defs", "definitions"):
                if not isinstance(value, dict):
                    raise self.bad(where, "must be an object")
                for name, sub in value.items():
                    self.check(sub, f"{where}.{name}", depth + 1)
            return
        if key not in _CONSTRAINING:
            raise self.unsupported(where, f"the keyword {key!r}")
        if key == "type":
            types = value if isinstance(value, list) else [value]
            if not types or any(t not in _TYPES for t in types):
                raise self.bad(where, f"{value!r} is not a JSON Schema type")
        elif key == "properties":
            if not isinstance(value, dict):
                raise self.bad(where, "must be an object")
            for name, sub in value.items():
                self.check(sub, f"{where}.{name}", depth + 1)
        elif key in ("additionalProperties", "items"):
            if isinstance(value, list):
                raise self.unsupported(where, "a list here")
            if not isinstance(value, bool):  # true: anything, false: nothing more
                self.check(value, where, depth + 1)
        elif key in ("prefixItems", "anyOf", "oneOf", "allOf"):
            if not isinstance(value, list) or not value:
                raise self.bad(where, "must be a non-empty array")
            for i, sub in enumerate(value):
                self.check(sub, f"{where}[{i}]", depth + 1)
        elif key in _COUNTS:
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_REPEAT:
                raise self.unsupported(where, f"a value other than an integer in [0, {MAX_REPEAT}]")
        elif key == "format":
            if value not in _FORMATS:
                raise self.unsupported(where, f"the format {value!r}")
        elif key == "$ref":
            if not isinstance(value, str) or not value.startswith("#/"):
                raise self.unsupported(where, "a reference outside this schema")
        elif key == "required":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.bad(where, "must be an array of strings")
        elif key == "enum":
            if not isinstance(value, list) or not value:
                raise self.bad(where, "must be a non-empty array")
        elif key == "pattern" and not isinstance(value, str):
            raise self.bad(where, "must be a string")


RESPONSE_SCHEMA = ("response_format.json_schema.schema", "response_format")


def schema_grammar(schema: Any, where: tuple[str, str] = RESPONSE_SCHEMA) -> str:
    """GBNF for a JSON schema; raises a 400 (naming `where`: label, param) for a schema it cannot enforce."""
    checker = _Checker(*where)
    raw = json.dumps(schema)
    if len(raw) > MAX_SCHEMA_BYTES:
        raise checker.bad("", f"{len(raw)} bytes; at most {MAX_SCHEMA_BYTES} are allowed")
    checker.check(schema)
    # imported here: loading llama_cpp loads llama.cpp's library, which a server on the torch runner
    # needs for nothing else
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar = json_schema_to_gbnf(raw)
    except Exception as exc:  # the converter raises ValueError, AssertionError, KeyError, re.error
        raise checker.unsupported("", f"this schema ({str(exc)[:200]})") from None
    return _CHAR_RULE.sub(lambda _: _JSON_CHAR, grammar)


def response_format_grammar(response_format: Any) -> str | None:
    """The grammar for a request's `response_format` (a validated `ResponseFormat`), None for text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        from llama_cpp.llama_grammar import JSON_GBNF

        return JSON_GBNF
    spec = response_format.json_schema
    if spec is None:
        raise ApiError(
            400,
            "response_format.json_schema is required when type is 'json_schema'",
            "invalid_request_error",
            "response_format",
            "invalid_value",
        )
    schema = spec.schema_ if spec.schema_ is not None else {"type": "object"}
    return schema_grammar(schema)
