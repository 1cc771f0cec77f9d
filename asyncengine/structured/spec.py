"""What a request's output must match: one hashable spec, the grammar cache's key."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar", "structural_tag"]
KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True, slots=True)
class StructuredSpec:
    # Which grammar: a JSON schema, any JSON object, a regex, one of fixed strings, an EBNF
    # grammar (xgrammar's GBNF dialect, rule `root`), or an xgrammar structural tag.
    kind: Kind
    # json_schema / structural_tag: compact JSON text (key order kept: it is the output's
    # property order); regex / grammar: the source text; choice: a JSON list of strings.
    value: str = ""
    # JSON kinds: allow any whitespace between tokens (False = compact separators only).
    any_whitespace: bool = True
    # The request field this came from, named in error messages (not part of the identity).
    param: str = field(default="structured_outputs", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            _fail(f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}", self.param)
        if not isinstance(self.value, str):
            _fail(f"{self.param} must be given as text, got {type(self.value).__name__}", self.param)
        if self.kind in ("regex", "grammar") and not self.value:
            _fail(f"{self.param}: an empty {self.kind} is not allowed", self.param)

    # -- constructors from what a request carries ----------------------------------------
    @staticmethod
    def json_schema(schema: Any, *, any_whitespace: bool = True, param: str = "structured_outputs.json") -> StructuredSpec:
        """A JSON schema given as a dict/bool or as JSON text."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                _fail(f"{param} is not valid JSON: {e}", param)
        if not isinstance(schema, (dict, bool)):
            _fail(f"{param} must be a JSON schema object, got {type(schema).__name__}", param)
        return StructuredSpec("json_schema", _compact(schema), any_whitespace, param)

    @staticmethod
    def json_object(*, any_whitespace: bool = True, param: str = "response_format") -> StructuredSpec:
        return StructuredSpec("json_object", "", any_whitespace, param)

    @staticmethod
    def regex(pattern: Any, *, param: str = "structured_outputs.regex") -> StructuredSpec:
        if not isinstance(pattern, str):
            _fail(f"{param} must be a string", param)
        return StructuredSpec("regex", pattern, True, param)

    @staticmethod
    def grammar(ebnf: Any, *, param: str = "structured_outputs.grammar") -> StructuredSpec:
        if not isinstance(ebnf, str):
            _fail(f"{param} must be a string", param)
        return StructuredSpec("grammar", ebnf, True, param)

    @staticmethod
    def choice(options: Any, *, param: str = "structured_outputs.choice") -> StructuredSpec:
        if not isinstance(options, list) or not options or not all(isinstance(o, str) and o for o in options):
            _fail(f"{param} must be a non-empty list of non-empty strings", param)
        return StructuredSpec("choice", _compact(options), True, param)

    @staticmethod
    def structural_tag(tag: dict[str, Any], *, param: str = "structured_outputs.structural_tag") -> StructuredSpec:
        if not isinstance(tag, dict):
            _fail(f"{param} must be an object", param)
        return StructuredSpec("structural_tag", _compact(tag), True, param)

    def choices(self) -> list[str]:
        return json.loads(self.value) if self.kind == "choice" else []


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _fail(message: str, param: str) -> NoReturn:
    from asyncengine.sampling_params import InvalidRequestError  # here: sampling_params imports this module

    raise InvalidRequestError(message, param)
