"""The exported logprob-contract functions, on hand-built logits."""
from __future__ import annotations

import math

import torch

from asyncengine import logprobs as L
from asyncengine.detokenizer import IncrementalDetokenizer
from asyncengine.sampling_params import SamplingParams


def sp(**kw: object) -> SamplingParams:
    return SamplingParams(**kw)


def test_top_k_ties_break_by_lower_token_id() -> None:
    z = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 0.0]])
    mask = L.support_mask(z, [sp(top_k=2)])
    assert mask[0].tolist() == [False, True, False, True, False, False]


def test_row_argmax_is_torch_argmax_with_ties_infinities_and_nan() -> None:
    g = torch.Generator().manual_seed(0)
    for rows, vocab in [(64, 49152), (3, 1000), (5, 512), (2, 100), (7, 1537), (1, 2048)]:
        for trial in range(12):
            x = torch.randn(rows, vocab, generator=g)
            if trial % 3 == 0:
                x = x.round()  # many ties: the lowest id must win
            if trial % 4 == 1:
                x[0] = float("-inf")
            if trial % 4 == 2:
                x[-1, vocab // 3] = float("nan")
                x[-1, vocab // 2] = float("nan")
            if trial % 4 == 3:
                x[:, -1] = 100.0  # the maximum in a short last chunk
            assert torch.equal(L.row_argmax(x), torch.argmax(x, dim=-1)), (rows, vocab, trial)
    assert L.row_argmax(torch.empty(0, 600)).shape == (0,)


def test_top_p_keeps_smallest_prefix_reaching_mass() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    z = probs.log()[None]
    assert L.support_mask(z, [sp(top_p=0.5)])[0].tolist() == [True, False, False, False]
    assert L.support_mask(z, [sp(top_p=0.81)])[0].tolist() == [True, True, True, False]
    assert L.support_mask(z, [sp(top_p=0.1)])[0].tolist() == [True, False, False, False]


def test_min_p_is_relative_to_the_top_token() -> None:
    z = torch.tensor([[0.0, math.log(0.5), math.log(0.09), math.log(0.2)]])
    assert L.support_mask(z, [sp(min_p=0.1)])[0].tolist() == [True, True, False, True]


def test_reconciliation_identity() -> None:
    torch.manual_seed(0)
    z = torch.randn(4, 100) * 3
    params = [sp(temperature=0.7, top_k=10), sp(temperature=1.3, top_p=0.8), sp(temperature=1.0, min_p=0.2),
              sp(temperature=0.0)]
    scaled = L.apply_temperature(z, params)
    mask = L.support_mask(scaled, params)
    proc = L.processed_log_probs(scaled, mask)
    kept = L.log_kept_mass(scaled, mask)
    for r in range(4):
        t = int(torch.nonzero(mask[r])[0])
        recon = torch.log_softmax(scaled[r], -1)[t] - kept[r]
        assert abs(recon.item() - proc[r, t].item()) < 1e-6
    assert torch.equal(scaled[3], z[3])  # greedy rows use T = 1
    assert torch.isinf(proc[0]).sum() == 90


def test_penalties() -> None:
    z = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = L.apply_penalties(z, [sp(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)],
                            [[0]], [[1, 1, 2]])
    # rep: token 0 (prompt) 2 -> 1, token 1 -2 -> -4, token 2 1 -> 0.5; then freq/presence on outputs
    assert out[0].tolist() == [1.0, -4.0 - 0.5 - 0.5, 0.5 - 0.25 - 0.5, 0.5]


def test_sampling_depends_only_on_seed_and_step() -> None:
    assert L.uniform(7, 3) == L.uniform(7, 3)
    assert L.uniform(7, 3) != L.uniform(7, 4) and L.uniform(7, 3) != L.uniform(8, 3)
    us = [L.uniform(1, i) for i in range(2000)]
    assert 0.0 <= min(us) and max(us) < 1.0 and abs(sum(us) / len(us) - 0.5) < 0.03
    log_p = torch.tensor([float("-inf"), math.log(0.25), float("-inf"), math.log(0.75)])
    assert L.sample_from(log_p, 0.0) == 1 and L.sample_from(log_p, 0.2499) == 1
    assert L.sample_from(log_p, 0.2501) == 3 and L.sample_from(log_p, 0.999999) == 3


def test_top_n_sorted_with_ties_by_id() -> None:
    lp = torch.tensor([[-1.0, -0.5, -1.0, -3.0, -1.0]])
    assert L.top_n(lp, 3)[0] == [(1, -0.5), (0, -1.0), (2, -1.0)]


def test_sequence_logprobs_matches_per_step_penalties() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 20)
    params = sp(temperature=0.8, frequency_penalty=1.0)
    out = L.sequence_logprobs(logits, [1, 2], [5, 5, 6], params)
    # Step 2 was sampled with one 5 already emitted: its processed logprob sees the penalty.
    z = logits[2].clone()
    z[5] -= 2.0
    want = torch.log_softmax(z / 0.8, -1)[6]
    assert abs(out["processed"][2].item() - want.item()) < 1e-6


class ByteTokenizer:
    """One token per UTF-8 byte: splits multi-byte characters across tokens."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_detokenizer_never_splits_a_character() -> None:
    text = "añ東😀b"
    detok = IncrementalDetokenizer(ByteTokenizer(), [], (), False, True)
    pieces = []
    for b in text.encode():
        detok.add(b)
        pieces.append(detok.take(False))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_across_tokens_is_held_back_and_cut() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer(), [], ("END",), False, True)
    streamed, stop = "", None
    for b in "abcEN".encode():
        assert detok.add(b) is None
        streamed += detok.take(False)
    assert streamed == "abc"  # "EN" held back: it may be the start of "END"
    stop = detok.add(ord("D"))
    assert stop == "END" and streamed + detok.take(True) == "abc"


def test_transformers_ignores_our_kernels_package() -> None:
    from transformers.utils import import_utils

    assert not import_utils.is_kernels_available()
    from transformers import LlamaForCausalLM  # noqa: F401


def test_tiny_temperature_is_greedy_not_nan() -> None:
    z = torch.tensor([[1.0, 3.0, 2.0]])
    for t in (0.0, 1e-300, 1e-6):
        params = [sp(temperature=t)]
        assert params[0].greedy
        scaled = L.apply_temperature(z, params)
        assert torch.equal(scaled, z)
        assert torch.isfinite(L.processed_log_probs(scaled, L.support_mask(scaled, params))).all()
    assert not sp(temperature=1e-4).greedy
