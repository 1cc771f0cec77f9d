from __future__ import annotations

import os

# Triton picks the interpreter when kernels are defined (at import), so this must be set
# before anything imports triton. It is the one environment switch the tests use.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.tiny_models import make_model_dir  # noqa: E402

ARCHS = ("llama", "qwen2", "qwen3")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_model: uses the default SmolLM2-135M-Instruct checkpoint (slower)")
    config.addinivalue_line("markers", "ray: starts a local Ray cluster (replicas as actors)")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random checkpoint per architecture, built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_model_dir(root / arch, arch, seed=i) for i, arch in enumerate(ARCHS)}


@pytest.fixture(scope="session")
def llama_dir(tiny_dirs: dict[str, Path]) -> Path:
    return tiny_dirs["llama"]
