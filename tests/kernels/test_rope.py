"""RoPE (HF rotate_half layout): the torch reference against a float64 rotation, the
Triton kernel against the reference on strided q/k views with GQA, batch invariance.
Tolerance: fp32 defaults of assert_close (rtol 1.3e-6, atol 1e-5)."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

from kernels.rope import apply_rope_torch, apply_rope_triton, rope_cos_sin


def _inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _qk(
    tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as strided views of one fused qkv projection, as the model produces them."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    q = qkv[:, : num_heads * head_dim].view(tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim]
    return q, k.view(tokens, num_kv_heads, head_dim)


def _naive(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    freqs = positions.double()[:, None] * inv_freq.double()[None, :]  # [T, D/2]
    cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x.double()[..., :half], x.double()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def test_torch_reference_matches_float64_rotation() -> None:
    inv_freq = _inv_freq(64)
    q, k = _qk(11, 9, 3, 64, seed=0)
    positions = torch.tensor([0, 1, 2, 5, 17, 31, 63, 64, 100, 200, 255])
    q_out, k_out = apply_rope_torch(q, k, positions, rope_cos_sin(inv_freq, 1.0, 256))
    torch.testing.assert_close(q_out.double(), _naive(q, positions, inv_freq), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_out.double(), _naive(k, positions, inv_freq), rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("need_triton")
@pytest.mark.parametrize(
    "tokens,num_heads,num_kv_heads,head_dim,scaling",
    [(1, 4, 4, 32, 1.0), (7, 8, 4, 64, 1.0), (19, 9, 3, 64, 1.0), (5, 8, 2, 128, 0.7)],
)
def test_triton_matches_torch(
    tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float
) -> None:
    q, k = _qk(tokens, num_heads, num_kv_heads, head_dim, seed=tokens)
    cos_sin = rope_cos_sin(_inv_freq(head_dim), scaling, 300)
    positions = torch.randint(0, 300, (tokens,), generator=torch.Generator().manual_seed(tokens))
    q_ref, k_ref = apply_rope_torch(q, k, positions, cos_sin)
    q_out, k_out = apply_rope_triton(q, k, positions, cos_sin)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    torch.testing.assert_close(q_out, q_ref)
    torch.testing.assert_close(k_out, k_ref)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_batch_invariance(impl: str, request: pytest.FixtureRequest) -> None:
    if impl == "triton":
        request.getfixturevalue("need_triton")
    fn = apply_rope_torch if impl == "torch" else apply_rope_triton
    q, k = _qk(12, 9, 3, 64, seed=5)
    positions = torch.arange(40, 52)
    cos_sin = rope_cos_sin(_inv_freq(64), 1.0, 64)
    q_all, k_all = fn(q, k, positions, cos_sin)
    for t in (0, 5, 11):
        q_one, k_one = fn(q[t : t + 1], k[t : t + 1], positions[t : t + 1], cos_sin)
        assert torch.equal(q_one[0], q_all[t]) and torch.equal(k_one[0], k_all[t])
