"""The engine's entry point to structured outputs: one per engine, backend built lazily."""
from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from asyncengine.sampling_params import InvalidRequestError
from asyncengine.structured.spec import StructuredSpec
from asyncengine.structured.state import GrammarState


class StructuredOutputs:
    """Starts each request's grammar state. The xgrammar backend (tokenizer tables, ~0.2 s
    for a 49k vocabulary) is built at the first structured request, not at engine start."""

    def __init__(self, tokenizer: Any | None, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = tuple(eos_token_ids)
        self._backend: Any | None = None
        self._lock = threading.Lock()

    @property
    def backend(self) -> Any:
        with self._lock:
            if self._backend is None:
                from asyncengine.structured.backend import GrammarBackend

                self._backend = GrammarBackend(self._tokenizer, self._vocab_size, self._eos_token_ids)
            return self._backend

    def precompile(self, spec: StructuredSpec | None) -> None:
        """Compile (into the cache) ahead of admission, off the step thread: a grammar that
        takes seconds to compile then never stalls the other requests' steps. Raises
        InvalidRequestError like `start`."""
        if spec is not None:
            self._check(spec)
            self.backend.compile(spec)

    def start(self, spec: StructuredSpec | None) -> GrammarState | None:
        """A fresh grammar state for a request (None for free text); compiles the spec (cached)
        and raises InvalidRequestError naming spec.param when it is invalid."""
        if spec is None:
            return None
        self._check(spec)
        return self.backend.start(spec)

    def _check(self, spec: StructuredSpec) -> None:
        if self._tokenizer is None:
            raise InvalidRequestError("structured outputs need the model's tokenizer; this model has none", spec.param)
        if not self._eos_token_ids:
            raise InvalidRequestError("structured outputs need an end-of-sequence token; this model has none",
                                      spec.param)
