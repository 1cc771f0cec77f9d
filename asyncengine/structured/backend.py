"""xgrammar behind one small interface: compile a spec (cached), start a request's matcher.

xgrammar over llguidance: at batch 64 on the default model's 49,152-token vocabulary its
serial per-step mask fill measured 0.85-1.05 ms (64 valid JSON documents) / 0.7-1.3 ms
(random JSON walks) / 47-49 ms (random regex walks) against llguidance's 4.1-5.0 / 2.6-3.0
/ 54-63 ms (`bench/structured.py --masks`, 3 alternating rounds, shared 2-core Xeon).
xgrammar's own 2-thread batch fill measured slower than its serial loop on these cores.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from asyncengine.sampling_params import InvalidRequestError
from asyncengine.structured.spec import StructuredSpec
from asyncengine.structured.state import GrammarState

# xgrammar's errors start with "[time] /path/file.cc:line: "; the rest is the message.
_LOCATION = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


class GrammarBackend:
    """Compiles specs against one tokenizer and vocabulary; compiled grammars are cached
    per spec (least recently used dropped past `cache_size`). Thread-safe: the async edge
    compiles ahead in a worker thread (xgrammar releases the GIL), the step thread reads."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int], cache_size: int = 256) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(eos_token_ids))
        # One compile thread: compiles run on the engine's step thread, which shares the cores
        # with the model; our own cache below is keyed by the whole spec.
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[StructuredSpec, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # the cache
        self._compile_lock = threading.Lock()
        self.num_compiles = 0

    def compile(self, spec: StructuredSpec) -> Any:
        """The compiled grammar of spec; InvalidRequestError (param = spec.param) if invalid.
        Compiles run one at a time, so n choices of one request compile their spec once."""
        hit = self._cached(spec)
        if hit is not None:
            return hit
        with self._compile_lock:
            hit = self._cached(spec)
            if hit is not None:
                return hit
            try:
                compiled = self._compile(spec)
            except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's parse / conversion errors
                text = str(e).strip()
                message = _LOCATION.sub("", text).splitlines()[0] if text else type(e).__name__
                raise InvalidRequestError(f"invalid {spec.param}: {message}", spec.param) from None
            with self._lock:
                self.num_compiles += 1
                self._cache[spec] = compiled
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            return compiled

    def _cached(self, spec: StructuredSpec) -> Any | None:
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
            return hit

    def start(self, spec: StructuredSpec) -> GrammarState:
        """A fresh matcher for one request (at its first output token)."""
        return GrammarState(self._xgr.GrammarMatcher(self.compile(spec)), self.eos_token_ids)

    def _compile(self, spec: StructuredSpec) -> Any:
        c = self._compiler
        if spec.kind == "json_schema":
            schema = json_safe_strings(json.loads(spec.value))
            return c.compile_json_schema(json.dumps(schema), any_whitespace=spec.any_whitespace)
        if spec.kind == "json_object":
            # Any object: strict mode would forbid the properties the schema does not list.
            return c.compile_json_schema('{"type":"object"}', any_whitespace=spec.any_whitespace, strict_mode=False)
        if spec.kind == "regex":
            return c.compile_regex(spec.value)
        if spec.kind == "choice":
            return c.compile_grammar(choice_ebnf(spec.choices()))
        if spec.kind == "grammar":
            return c.compile_grammar(spec.value)
        return c.compile_structural_tag(spec.value)


# xgrammar (0.2.9) spells a length-bounded string with any character but quote, backslash,
# CR and LF: control characters that JSON forbids get through (seen: "\x04"). The same
# bounds as a pattern of JSON-safe characters keep every output parseable.
_SAFE_CHARS = '[^"\\\\\\x00-\\x1f]'
_FREE_STRING_KEYS = ("pattern", "format", "enum", "const")


def json_safe_strings(node: Any) -> Any:
    """The schema with each length-bounded free string also given a JSON-safe pattern."""
    if isinstance(node, list):
        return [json_safe_strings(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: json_safe_strings(v) for k, v in node.items()}
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and not any(k in out for k in _FREE_STRING_KEYS):
        lo, hi = out.get("minLength", 0), out.get("maxLength", "")
        if isinstance(lo, int) and isinstance(hi, (int, str)):
            # The pattern carries the bounds (xgrammar ignores lengths next to a pattern).
            out = {k: v for k, v in out.items() if k not in ("minLength", "maxLength")}
            out["pattern"] = f"^{_SAFE_CHARS}{{{lo},{hi}}}$"
    return out


def choice_ebnf(options: Sequence[str]) -> str:
    """root ::= "a" | "b" ...: JSON string escapes are also EBNF string-literal escapes."""
    return "root ::= " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options)
