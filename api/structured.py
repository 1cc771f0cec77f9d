"""Structured-output fields of a request -> one StructuredSpec (or None for free text).

Accepted, on /v1/completions and /v1/chat/completions:
- OpenAI `response_format`: {"type": "text" | "json_object"}, {"type": "json_schema",
  "json_schema": {"name", "schema", "strict"}}, or an xgrammar {"type": "structural_tag", "format": ...};
- vLLM `structured_outputs`: exactly one of json, regex, choice, grammar, json_object,
  structural_tag, with disable_any_whitespace (and disable_fallback /
  disable_additional_properties, accepted: xgrammar never falls back, and schemas are
  compiled in strict mode, so properties a schema does not allow are never generated);
- vLLM's older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`
  (+ `guided_decoding_backend` "xgrammar" / "auto").
At most one of them may constrain a request. Errors raise InvalidRequestError naming the
field; the schema or pattern itself is checked when the engine compiles it (also a 400).
"""
from __future__ import annotations

from typing import Any

from asyncengine.sampling_params import InvalidRequestError
from asyncengine.structured import StructuredSpec

# Request fields (name -> JSON kind, as api.protocol.check_fields takes them).
STRUCTURED_FIELDS = {
    "response_format": "object", "structured_outputs": "object", "guided_json": "any", "guided_regex": "str",
    "guided_choice": "list", "guided_grammar": "str", "guided_decoding_backend": "str",
    "guided_whitespace_pattern": "str",
}
_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
_OUTPUT_OPTIONS = ("disable_any_whitespace", "disable_fallback", "disable_additional_properties")
_BACKENDS = ("xgrammar", "auto")


def parse_structured(body: dict[str, Any]) -> StructuredSpec | None:
    """The one spec a request asks for (None = free text)."""
    specs: dict[str, StructuredSpec] = {}
    if "response_format" in body:
        spec = _response_format(body["response_format"])
        if spec is not None:
            specs["response_format"] = spec
    if "structured_outputs" in body:
        spec = _structured_outputs(body["structured_outputs"])
        if spec is not None:
            specs["structured_outputs"] = spec
    specs.update(_guided(body))
    if len(specs) > 1:
        names = ", ".join(specs)
        raise InvalidRequestError(f"only one structured-output field may be given, got {names}", list(specs)[1])
    return next(iter(specs.values()), None)


def _response_format(fmt: dict[str, Any]) -> StructuredSpec | None:
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredSpec.json_object(param="response_format")
    if kind == "json_schema":
        inner = fmt.get("json_schema")
        if not isinstance(inner, dict) or "schema" not in inner:
            raise InvalidRequestError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': "
                                      "{...}}}", "response_format.json_schema")
        return StructuredSpec.json_schema(inner["schema"], param="response_format.json_schema.schema")
    if kind == "structural_tag":
        return StructuredSpec.structural_tag(fmt, param="response_format")
    raise InvalidRequestError(
        f"response_format type must be text, json_object, json_schema or structural_tag, got {kind!r}",
        "response_format",
    )


def _structured_outputs(options: dict[str, Any]) -> StructuredSpec | None:
    unknown = sorted(set(options) - set(_OUTPUT_KINDS) - set(_OUTPUT_OPTIONS))
    if unknown:
        raise InvalidRequestError(f"structured_outputs does not support {', '.join(unknown)}",
                                  f"structured_outputs.{unknown[0]}")
    for name in _OUTPUT_OPTIONS + ("json_object",):
        if name in options and not isinstance(options[name], bool):
            raise InvalidRequestError(f"structured_outputs.{name} must be a boolean", f"structured_outputs.{name}")
    given = [k for k in _OUTPUT_KINDS if options.get(k) is not None and options.get(k) is not False]
    if len(given) > 1:
        raise InvalidRequestError(f"structured_outputs takes one of {', '.join(_OUTPUT_KINDS)}, got {', '.join(given)}",
                                  f"structured_outputs.{given[1]}")
    if not given:
        return None
    kind, value = given[0], options[given[0]]
    param = f"structured_outputs.{kind}"
    any_ws = not options.get("disable_any_whitespace", False)
    if kind == "json":
        return StructuredSpec.json_schema(value, any_whitespace=any_ws, param=param)
    if kind == "json_object":
        return StructuredSpec.json_object(any_whitespace=any_ws, param=param)
    if kind == "structural_tag":
        return StructuredSpec.structural_tag(_json_object(value, param), param=param)
    return _text_spec(kind, value, param)


def _guided(body: dict[str, Any]) -> dict[str, StructuredSpec]:
    backend = body.get("guided_decoding_backend")
    if backend is not None and backend not in _BACKENDS:
        raise InvalidRequestError(f"guided_decoding_backend must be one of {', '.join(_BACKENDS)}, got {backend!r}",
                                  "guided_decoding_backend")
    if "guided_whitespace_pattern" in body:
        raise InvalidRequestError("guided_whitespace_pattern is not supported by the xgrammar backend",
                                  "guided_whitespace_pattern")
    out: dict[str, StructuredSpec] = {}
    for kind in ("json", "regex", "choice", "grammar"):
        name = f"guided_{kind}"
        if name in body:
            out[name] = (StructuredSpec.json_schema(body[name], param=name) if kind == "json"
                         else _text_spec(kind, body[name], name))
    return out


def _text_spec(kind: str, value: Any, param: str) -> StructuredSpec:
    if kind == "regex":
        return StructuredSpec.regex(value, param=param)
    if kind == "choice":
        return StructuredSpec.choice(value, param=param)
    return StructuredSpec.grammar(value, param=param)


def _json_object(value: Any, param: str) -> dict[str, Any]:
    import json

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise InvalidRequestError(f"{param} is not valid JSON: {e}", param) from None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{param} must be a JSON object", param)
    return value
