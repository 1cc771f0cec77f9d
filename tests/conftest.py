from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import make_model_dir

ARCHS = ("llama", "qwen2", "qwen3")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_model: uses the default SmolLM2-135M-Instruct checkpoint (slower)")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random checkpoint per architecture, built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_model_dir(root / arch, arch, seed=i) for i, arch in enumerate(ARCHS)}


@pytest.fixture(scope="session")
def llama_dir(tiny_dirs: dict[str, Path]) -> Path:
    return tiny_dirs["llama"]
