"""FaultHook: a test hook that injects faults inside the engine.

Passed to EngineCore / AsyncEngine as an object (never an environment variable or a
config flag), so production engines carry none and pay one `is None` check per site.
Requests are matched by a marker contained in their request id, so a test can target
one HTTP request through its `request_id` field.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch


class InjectedFault(RuntimeError):
    """Raised by FaultHook where a test asked for a fault."""


@dataclass(slots=True)
class FaultHook:
    # Engine steps (1-based, counted by EngineCore) whose batched forward raises once:
    # a transient fault, which the solo retries of the step then survive.
    forward_raises_at_steps: frozenset[int] = frozenset()
    # Any forward containing a request whose id contains one of these raises (a
    # "poison" request: it fails, its batch-mates are retried without it).
    forward_raises_for: tuple[str, ...] = ()
    # These requests' logits rows become NaN after the forward.
    nan_logits_for: tuple[str, ...] = ()
    # Detokenizing these requests' tokens raises.
    detokenize_raises_for: tuple[str, ...] = ()
    # Encoding text containing this substring raises (the loop-side tokenizer).
    tokenize_raises_on: str | None = None
    # step() raises outside any request's isolation at this step: a fatal engine error.
    fatal_at_step: int | None = None
    # A marked request's fault fires only after this many clean calls of its kind (so a
    # stream can send some chunks before its error).
    clean_calls: int = 0
    calls: dict[tuple[str, str], int] = field(default_factory=dict)
    # The step being run (set by EngineCore) and the steps whose forward already raised.
    step: int = 0
    fired: set[int] = field(default_factory=set)

    def before_step(self, step: int) -> None:
        self.step = step
        if self.fatal_at_step is not None and step >= self.fatal_at_step:
            raise InjectedFault(f"injected fatal engine error at step {step}")

    def after_forward(self, request_ids: list[str]) -> None:
        """Called once the forward wrote the batch's KV (a retry must overwrite it)."""
        poisoned = [r for r in request_ids if self._fires("forward", self.forward_raises_for, r)]
        if poisoned:
            raise InjectedFault(f"injected forward error for {poisoned}")
        if self.step in self.forward_raises_at_steps and self.step not in self.fired:
            self.fired.add(self.step)
            raise InjectedFault(f"injected forward error at step {self.step}")

    def corrupt_logits(self, logits: torch.Tensor, row_request_ids: list[str]) -> None:
        """logits: [R, V] fp32, one row per entry of row_request_ids (in place)."""
        for row, rid in enumerate(row_request_ids):
            if self._fires("logits", self.nan_logits_for, rid):
                logits[row, 0] = float("nan")

    def before_detokenize(self, request_id: str) -> None:
        if self._fires("detokenize", self.detokenize_raises_for, request_id):
            raise InjectedFault(f"injected detokenizer error for {request_id}")

    def _fires(self, kind: str, markers: tuple[str, ...], request_id: str) -> bool:
        if not any(m in request_id for m in markers):
            return False
        n = self.calls[kind, request_id] = self.calls.get((kind, request_id), 0) + 1
        return n > self.clean_calls

    def wrap_tokenizer(self, tokenizer: Any) -> Any:
        if self.tokenize_raises_on is None or tokenizer is None:
            return tokenizer
        return _FaultyTokenizer(tokenizer, self.tokenize_raises_on)


class _FaultyTokenizer:
    """A tokenizer whose encode raises on text containing `trigger`; all else delegates."""

    def __init__(self, tokenizer: Any, trigger: str) -> None:
        self._tok = tokenizer
        self._trigger = trigger

    def encode(self, text: str, *args: Any, **kwargs: Any) -> list[int]:
        if self._trigger in text:
            raise InjectedFault(f"injected tokenizer error on {text[:40]!r}")
        return list(self._tok.encode(text, *args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._tok, name, value)

    def __deepcopy__(self, memo: dict[int, Any]) -> _FaultyTokenizer:
        return _FaultyTokenizer(copy.deepcopy(self._tok, memo), self._trigger)
