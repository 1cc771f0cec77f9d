"""Marks for the tests that need a CUDA GPU (`pytest -m cuda`; scripts/gpu_check.sh).

They skip cleanly without one, and also when the Triton kernels were built for the
interpreter (TRITON_INTERPRET=1, which tests/conftest.py sets by default): on a GPU,
run them with TRITON_INTERPRET=0 so that the compiled kernels are what is tested.
"""
from __future__ import annotations

import pytest
import torch


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        from kernels.dispatch import _interpreted

        interpreted = _interpreted()
    except (ImportError, AttributeError) as exc:  # pragma: no cover - triton missing on a GPU machine
        return f"triton cannot be imported: {exc}"
    if interpreted:
        return "the Triton kernels are interpreted: run with TRITON_INTERPRET=0 (scripts/gpu_check.sh)"
    return None


_REASON = _skip_reason()
# Marks for one test or one parameter: pytest.param("cuda", marks=CUDA).
CUDA = [pytest.mark.cuda, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def interpreted_or_skip() -> None:
    """For the CPU variants of Triton tests: they run only under the interpreter."""
    from kernels.dispatch import _interpreted, triton_available

    if not triton_available():
        pytest.skip("triton cannot be imported; Triton tests skipped")
    if not _interpreted():
        pytest.skip("the Triton kernels are compiled for a GPU here (TRITON_INTERPRET=0)")
