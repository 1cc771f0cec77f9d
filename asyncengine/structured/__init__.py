"""Structured outputs: grammars (JSON schema, regex, choice, EBNF, structural tags) that
constrain sampling. The grammar's allowed set is part of the support S of the logprob
contract (asyncengine.logprobs.grammar_support).

Only the spec and the tool-call helpers load here; the xgrammar backend is imported on
first use (`asyncengine.structured.backend`).
"""
from __future__ import annotations

from asyncengine.structured.spec import KINDS, StructuredSpec
from asyncengine.structured.tools import tool_call_spec

__all__ = ["KINDS", "StructuredSpec", "tool_call_spec"]
