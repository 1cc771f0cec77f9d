"""Sampling kernels. The torch references in kernels/sampling.py are checked against an
independent float64 implementation of the contract (asyncengine.parity.reference_support
and a float64 log-softmax: support masks and top-N ids exactly, log-probabilities at 1e-5),
and bitwise against `asyncengine.logprobs` (they are the sampler's functions, so the CPU
and kernel paths give the same bits); the Triton kernels (interpreter)
against those references: log-probabilities at assert_close's fp32 defaults (rtol 1.3e-6,
atol 1e-5), top-N token ids and support masks exactly (including exact ties, which go
to the lower token id); and batch invariance, bitwise."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

from asyncengine import logprobs as L
from asyncengine.parity import reference_support
from asyncengine.sampling_params import SamplingParams
from kernels.sampling import (
    log_softmax_topn_torch,
    log_softmax_topn_triton,
    support_mask_torch,
    support_mask_triton,
)

# (top_k, top_p, min_p) per row: off, top-k only, top-p only, both, min-p, everything.
PARAMS = [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.9, 0.0), (40, 0.5, 0.0), (0, 1.0, 0.05), (-1, 0.95, 0.2)]


def _logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Random logits with exact ties: integer-rounded rows and one constant row."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=gen) * 2.5  # [R, V]
    z[1::3] = torch.round(z[1::3])
    z[-1, vocab // 2 :] = 0.0
    return z


def _param_tensors(params: list[tuple[int, float, float]]) -> tuple[torch.Tensor, ...]:
    top_k, top_p, min_p = zip(*params)
    return (torch.tensor(top_k), torch.tensor(top_p, dtype=torch.float64),
            torch.tensor(min_p, dtype=torch.float64))


def test_log_softmax_reference_is_the_logprob_contract() -> None:
    z = _logits(6, 300, seed=0)
    ids = torch.arange(6) * 37
    mask = L.support_mask(z, [SamplingParams(top_k=k, top_p=p, min_p=m) for k, p, m in PARAMS])
    for m, expected in ((None, L.raw_log_probs(z)), (mask, L.processed_log_probs(z, mask))):
        out = log_softmax_topn_torch(z, ids, 6, m)
        assert torch.equal(out.logprobs, expected)
        assert torch.equal(out.chosen, expected[torch.arange(6), ids])
        for r, top in enumerate(L.top_n(expected, 6)):
            assert out.top_ids[r].tolist() == [t for t, _ in top]
            assert out.top_values[r].tolist() == [v for _, v in top]


@pytest.mark.parametrize("vocab", [300, 2500])
def test_torch_references_match_an_independent_float64_contract(vocab: int) -> None:
    z = _logits(6, vocab, seed=vocab + 7)
    ids = torch.arange(6) * 37 % vocab
    mask = support_mask_torch(z, *_param_tensors(PARAMS))
    want_mask = torch.stack([reference_support(z[r].double(), *PARAMS[r]) for r in range(6)])
    assert torch.equal(mask, want_mask)
    for m in (None, want_mask):
        x = z.double() if m is None else z.double().masked_fill(~m, float("-inf"))
        want = torch.log_softmax(x, dim=-1)  # [6, V] float64
        out = log_softmax_topn_torch(z, ids, 6, m)
        torch.testing.assert_close(out.logprobs.double(), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.chosen.double(), want[torch.arange(6), ids], atol=1e-5, rtol=0)
        order = torch.sort(want, dim=-1, descending=True, stable=True).indices[:, :6]  # ties: lower id first
        assert torch.equal(out.top_ids, order)


def test_support_mask_reference_is_the_logprob_contract() -> None:
    z = _logits(6, 300, seed=1)
    sampling = [SamplingParams(top_k=k, top_p=p, min_p=m) for k, p, m in PARAMS]
    assert torch.equal(support_mask_torch(z, *_param_tensors(PARAMS)), L.support_mask(z, sampling))


def test_support_mask_reference_tie_and_edge_cases() -> None:
    z = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    one = torch.tensor([1.0], dtype=torch.float64)
    zero = torch.tensor([0.0], dtype=torch.float64)
    # top-2 among three tied maxima: the two lower ids.
    assert support_mask_torch(z, torch.tensor([2]), one, zero).tolist() == [[False, True, True, False, False]]
    # A tiny top_p still keeps the most likely token (the lowest id among the tied).
    tiny = torch.tensor([1e-6], dtype=torch.float64)
    kept = support_mask_torch(z, torch.tensor([0]), tiny, zero)
    assert kept.tolist() == [[False, True, False, False, False]]


@pytest.mark.usefixtures("need_triton")
@pytest.mark.parametrize("vocab,num_top", [(300, 5), (2500, 20), (64, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_log_softmax_topn_triton_matches_torch(vocab: int, num_top: int, masked: bool) -> None:
    z = _logits(6, vocab, seed=vocab)
    ids = torch.randint(0, vocab, (6,), generator=torch.Generator().manual_seed(1))
    mask = support_mask_torch(z, *_param_tensors(PARAMS)) if masked else None
    ref = log_softmax_topn_torch(z, ids, num_top, mask)
    out = log_softmax_topn_triton(z, ids, num_top, mask)
    torch.testing.assert_close(out.logprobs, ref.logprobs)
    torch.testing.assert_close(out.chosen, ref.chosen)
    torch.testing.assert_close(out.top_values, ref.top_values)
    assert torch.equal(out.top_ids, ref.top_ids)


@pytest.mark.usefixtures("need_triton")
@pytest.mark.parametrize("vocab", [300, 2100])
def test_support_mask_triton_matches_torch(vocab: int) -> None:
    z = _logits(6, vocab, seed=vocab + 1)
    params = _param_tensors(PARAMS)
    assert torch.equal(support_mask_triton(z, *params), support_mask_torch(z, *params))


@pytest.mark.usefixtures("need_triton")
def test_support_mask_triton_breaks_ties_by_token_id() -> None:
    z = torch.zeros(3, 128)  # uniform rows: every boundary is a tie
    z[2, ::2] = 1.0
    params = _param_tensors([(7, 1.0, 0.0), (0, 0.25, 0.0), (10, 0.5, 0.0)])
    got = support_mask_triton(z, *params)
    assert torch.equal(got, support_mask_torch(z, *params))
    assert torch.nonzero(got[0]).flatten().tolist() == list(range(7))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_batch_invariance(impl: str, request: pytest.FixtureRequest) -> None:
    if impl == "triton":
        request.getfixturevalue("need_triton")
    logsm = log_softmax_topn_torch if impl == "torch" else log_softmax_topn_triton
    support = support_mask_torch if impl == "torch" else support_mask_triton
    z = _logits(6, 300, seed=3)
    ids = torch.arange(6) * 11
    params = _param_tensors(PARAMS)
    mask = support(z, *params)
    batch = logsm(z, ids, 5, mask)
    for r in (0, 3, 5):
        one = slice(r, r + 1)
        assert torch.equal(support(z[one], *(p[one] for p in params)), mask[one])
        alone = logsm(z[one], ids[one], 5, mask[one])
        for got, full in zip(alone, batch):
            assert torch.equal(got[0], full[r])
