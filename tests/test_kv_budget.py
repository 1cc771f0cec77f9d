"""The KV pool's size when the config gives none (asyncengine/kv_budget.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from asyncengine.config import ConfigError, EngineConfig
from asyncengine.engine_core import EngineCore
from asyncengine.kv_budget import KV_MEMORY_FRACTION, available_memory_bytes, kv_pool_blocks

MiB = 2**20


def test_explicit_sizes_win() -> None:
    assert kv_pool_blocks(EngineConfig(num_kv_blocks=7), MiB, 4096, available=1) == 7
    assert kv_pool_blocks(EngineConfig(kv_cache_memory_gb=0.5), MiB, 4096, available=1) == 512
    assert kv_pool_blocks(EngineConfig(kv_cache_memory_gb=1e-9), MiB, 4096) == 2  # never below 2


def test_derived_size_is_the_smaller_of_need_and_free_memory() -> None:
    cfg = EngineConfig(max_num_seqs=8, block_size=16)
    # 8 sequences of 1000 tokens need 8 x 63 blocks; plenty free: the need decides
    assert kv_pool_blocks(cfg, MiB, 1000, available=100 * 2**30) == 8 * 63
    # little free: the fraction of it decides
    assert kv_pool_blocks(cfg, MiB, 1000, available=200 * MiB) == int(200 * KV_MEMORY_FRACTION)
    assert kv_pool_blocks(cfg, MiB, 1000, available=0) == 2


def test_available_memory_is_plausible() -> None:
    free = available_memory_bytes()
    assert 0 < free < 2**50


def test_engine_sizes_its_pool_from_the_need_when_memory_is_ample(llama_dir: Path) -> None:
    core = EngineCore(EngineConfig(model=str(llama_dir), max_num_seqs=4, max_model_len=200))
    expected = kv_pool_blocks(core.config, 1, 200, available=2**62)  # the need alone
    assert expected == 4 * -(-200 // core.config.block_size)
    assert core.pool.num_blocks == expected


def test_nonpositive_budget_is_rejected() -> None:
    with pytest.raises(ConfigError):
        EngineConfig(kv_cache_memory_gb=0)
