"""The sampler against an independent reference (asyncengine.parity.reference_support /
reference_logprobs: the contract in float64 by a full sort), at SmolLM2's vocabulary.

`_top_k_top_p_row` ranks a top-1024 candidate set and grows it (x4, up to the
vocabulary) until the top-p cut falls strictly inside it; tiny models (vocab 384) always
take the full sort, so these tests put the cut where each size is needed, and at exact
ties across the candidate boundary. Cuts sit midway between two consecutive masses, so
fp32-vs-float64 rounding (~1e-7) cannot move them.

Then a chi-square test of the draws: many seeds, one row, the observed token counts vs
the reference probabilities.
"""
from __future__ import annotations

import pytest
import torch

from asyncengine import logprobs as L
from asyncengine import sampler
from asyncengine.parity import reference_support
from asyncengine.request import Request
from asyncengine.sampling_params import SamplingParams

VOCAB = 49152


def _row(seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * scale  # [V] fp32


def _top_p_for_rank(z: torch.Tensor, top_k: int, keep: int) -> float:
    """A top_p that keeps exactly `keep` tokens (midway between two masses, float64)."""
    ranked = torch.sort(z.double(), descending=True, stable=True).values
    ranked = ranked[:top_k] if top_k > 0 else ranked
    probs = torch.softmax(ranked, 0)
    mass_before = torch.cumsum(probs, 0) - probs  # mass ranked before each token
    return float((mass_before[keep - 1] + mass_before[keep]) / 2)


@pytest.fixture
def candidate_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The candidate-set sizes `_top_k_top_p_row` ranks, in order."""
    sizes: list[int] = []
    ranked = L._ranked

    def recording(z: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        sizes.append(size)
        return ranked(z, size)

    monkeypatch.setattr(L, "_ranked", recording)
    return sizes


@pytest.mark.parametrize("top_k,keep,sizes", [
    (0, 600, [1024]),  # the cut inside the first candidate set
    (0, 3000, [1024, 4096]),  # one growth
    (0, 30000, [1024, 4096, 16384, VOCAB]),  # grows to the full sort
    (5000, 2000, [1024, 4096]),  # top-k wider than the candidates, then top-p
    (100, 99, [1024]),  # top-k inside the candidates: -inf beyond it ends the ranking
])
def test_top_p_candidate_path_and_growth_match_the_full_sort(
    candidate_sizes: list[int], top_k: int, keep: int, sizes: list[int]
) -> None:
    z = _row(keep)
    top_p = _top_p_for_rank(z, top_k, keep)
    got = L.support_mask(z[None], [SamplingParams(top_k=top_k, top_p=top_p)])[0]
    assert candidate_sizes == sizes
    want = reference_support(z.double(), top_k, top_p, 0.0)
    assert int(want.sum()) == keep
    assert torch.equal(got, want)


def test_top_p_cut_at_a_tie_across_the_candidate_boundary(candidate_sizes: list[int]) -> None:
    """Ranks 1000..1199 hold one value: a cut at rank 1010 is below a tie that the
    top-1024 set splits arbitrarily, so the set must grow; the lower ids are kept."""
    z = _row(7)
    order = torch.sort(z, descending=True, stable=True).indices
    z[order[1000:1200]] = z[order[1000]].item()
    top_p = _top_p_for_rank(z, 0, 1010)
    got = L.support_mask(z[None], [SamplingParams(top_p=top_p)])[0]
    assert candidate_sizes == [1024, 4096]
    want = reference_support(z.double(), 0, top_p, 0.0)
    tied = torch.nonzero(z == z[order[1000]]).flatten()  # ascending ids
    assert torch.equal(want & (z == z[order[1000]]), torch.isin(torch.arange(VOCAB), tied[:10]))
    assert torch.equal(got, want)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (0.7, 0, 0.95, 0.0), (1.3, 2000, 0.9, 0.0), (1.0, 0, 0.999, 0.001), (0.9, 40, 1.0, 0.05), (0.0, 0, 0.9, 0.0),
])
def test_sampler_logprobs_match_the_float64_reference(temperature: float, top_k: int, top_p: float,
                                                      min_p: float) -> None:
    """Every returned field at vocab 49152: token in the reference support, processed
    and raw logprobs, log_kept_mass (at fp32 rounding, 1e-5), and the identity
    processed = log_softmax(z')[t] - log_kept_mass on the sampler's own outputs."""
    from asyncengine.parity import reference_logprobs

    logits = torch.stack([_row(100 + i, 3.0) for i in range(8)])  # [8, V]
    reqs = [Request(f"r{i}", [1, 2, 3], SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                                       min_p=min_p, seed=i, return_raw_logprob=True,
                                                       return_log_kept_mass=True), seed=i) for i in range(8)]
    results = sampler.sample(logits, reqs)
    for r, (req, res) in enumerate(zip(reqs, results)):
        ref = reference_logprobs(logits[r : r + 1], [1, 2, 3], [res.token_id], req.params)
        assert bool(ref["support"][0, res.token_id]), "sampled outside the reference support"
        got = torch.tensor([res.logprob, res.raw_logprob, res.log_kept_mass], dtype=torch.float64)
        want = torch.stack([ref["processed"][0], ref["raw"][0], ref["log_kept_mass"][0]])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        t = 1.0 if req.params.greedy else temperature
        recon = torch.log_softmax(logits[r].double() / t, 0)[res.token_id] - res.log_kept_mass
        assert abs(recon.item() - res.logprob) <= 1e-5


# --- the draws: chi-square over many seeds --------------------------------------------
DRAWS = 8000
P_MIN = 1e-4  # the test's false-positive rate: a correct sampler fails it with these seeds w.p. 1e-4


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit; p-value = Q(df / 2, chi2 / 2)."""
    expected = probs * counts.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum()
    df = torch.tensor(float(probs.numel() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, chi2 / 2))


def _draw_counts(z: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """Sample the same row [V] with seeds 0..DRAWS-1, in batches, through sampler.sample."""
    counts = torch.zeros(z.numel(), dtype=torch.float64)
    for start in range(0, DRAWS, 1000):
        reqs = [Request(f"r{s}", [1], sp.with_options(seed=s), seed=s) for s in range(start, start + 1000)]
        for res in sampler.sample(z[None].expand(len(reqs), -1).contiguous(), reqs):
            counts[res.token_id] += 1
    return counts


def test_draws_follow_the_reference_distribution() -> None:
    """40 tokens of varied probability, top-k 30 and top-p 0.97 cut some of them: every
    draw lies in the reference support and the counts fit p (chi-square, p >= 1e-4). The
    same counts reject the distribution at T = 0.9 instead of 0.7 (the test has power)."""
    z = torch.linspace(0.0, 6.0, 40)[torch.randperm(40, generator=torch.Generator().manual_seed(3))]  # [40]
    sp = SamplingParams(temperature=0.7, top_k=30, top_p=0.97)
    counts = _draw_counts(z, sp)

    def reference_probs(temperature: float) -> torch.Tensor:
        scaled = z.double() / temperature
        keep = reference_support(scaled, sp.top_k, sp.top_p, 0.0)
        return torch.softmax(scaled.masked_fill(~keep, float("-inf")), 0), keep

    probs, keep = reference_probs(0.7)
    assert counts[~keep].sum() == 0 and 10 < int(keep.sum()) < 30
    assert _chi_square_p_value(counts[keep], probs[keep]) >= P_MIN
    wrong, _ = reference_probs(0.9)
    assert _chi_square_p_value(counts[keep], wrong[keep] / wrong[keep].sum()) < 1e-9
