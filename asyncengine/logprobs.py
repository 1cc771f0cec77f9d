"""The logprob contract (DESIGN.md), as functions shared by the sampler and trainers.

For logits z (fp32) of one position and sampling params:
  z'  = penalties(z) / T                      (T = 1 when greedy)
  S   = top-k, then top-p, then min-p support on softmax(z'), then intersected with
        the grammar's allowed set G when the request has structured output (if nothing of
        S is allowed: top-k/top-p/min-p over z' restricted to G instead; `grammar_support`)
  p   = softmax(z' restricted to S)
  processed logprob of t = log p(t);  raw logprob = log_softmax(z)[t]
  log_kept_mass = logsumexp(z'[S]) - logsumexp(z')
Ties are broken by lower token id everywhere (top-k, top-p, top-N), so the support is a
pure function of the row, whatever else is in the batch. Every function works row by
row on [R, V] tensors; a trainer calls the same functions on its own logits.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from asyncengine.row_reductions import (  # noqa: F401  (re-exported: the contract's reductions)
    RowStats, contract_exp, row_argmax, row_log_softmax, row_logsumexp, row_max_sum, row_stats, rows_finite,
)
from asyncengine.sampling_params import SamplingParams


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """logits: [R, V] fp32 -> penalized copy (rows without penalties are unchanged).

    repetition (HF): over prompt + output tokens, z/rp where z > 0 else z*rp;
    then frequency and presence (OpenAI/vLLM): z - freq * count - presence * (count > 0)
    over output tokens.
    """
    if not any(sp.penalized for sp in params):
        return logits  # nothing to change (callers never write into the result)
    out = logits.clone()
    for r, sp in enumerate(params):
        z = out[r]  # [V]
        if sp.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt_ids[r]) | set(output_ids[r])), dtype=torch.int64)
            if seen.numel():
                vals = z.index_select(0, seen)
                z.index_copy_(0, seen, torch.where(vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty))
        if (sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0) and len(output_ids[r]):
            counts = torch.bincount(torch.tensor(output_ids[r], dtype=torch.int64), minlength=z.numel())
            counts = counts[: z.numel()].to(z.dtype)
            z.sub_(sp.frequency_penalty * counts)
            z.sub_(sp.presence_penalty * (counts > 0).to(z.dtype))
    return out


def apply_temperature(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """z' = z / T per row; greedy rows (T below GREEDY_TEMPERATURE) use T = 1."""
    temps = [1.0 if sp.greedy else sp.temperature for sp in params]
    if all(t == 1.0 for t in temps):
        return logits
    return logits / torch.tensor(temps, dtype=logits.dtype)[:, None]


def support_mask(scaled: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """[R, V] bool: tokens kept by top-k, then top-p, then min-p on softmax(z').

    min-p is tested in logit space (z'_i - max z' >= log min_p), which is the same set
    whatever renormalization came before, and exact.
    """
    mask = torch.ones_like(scaled, dtype=torch.bool)
    for r, sp in enumerate(params):
        if sp.top_k_active or sp.top_p < 1.0:
            mask[r] = _top_k_top_p_row(scaled[r], sp.top_k, sp.top_p)
        if sp.min_p > 0.0:
            z = scaled[r]
            mask[r] &= (z - z.max()) >= math.log(sp.min_p)
    return mask


def _top_k_top_p_row(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Rank = (z' descending, token id ascending). top-k keeps the first k. top-p then
    keeps token i iff the mass ranked before it is < top_p, where p = exp(z' - max) / sum
    over the top-k support (contract_exp elementwise; `row_max_sum`) and the mass is summed in
    float64 in rank order. Each decision depends only on a prefix of the ranking, so a
    top-C candidate set gives the same bits as a full sort whenever the cut falls
    strictly inside it (checked; otherwise C grows up to the vocabulary)."""
    vocab = z.numel()
    mask = _top_k_mask(z, top_k) if 0 < top_k < vocab else torch.ones(vocab, dtype=torch.bool)
    if top_p >= 1.0:
        return mask
    kept = z.masked_fill(~mask, float("-inf"))
    peak, total = row_max_sum(kept[None])
    size = min(vocab, 1024)
    while True:
        values, ids = _ranked(kept, size)
        mass_before = torch.cumsum((contract_exp(values - peak[0]) / total[0]).double(), dim=-1)
        mass_before = torch.cat([mass_before.new_zeros(1), mass_before[:-1]])
        n_keep = int((mass_before < top_p).sum())
        # Exact when the last kept token is strictly above every token outside the set.
        if size == vocab or (n_keep < size and values[n_keep - 1] > values[-1]):
            break
        size = min(vocab, size * 4)
    out = torch.zeros(vocab, dtype=torch.bool)
    out[ids[:n_keep]] = True
    return out


def _top_k_mask(z: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest, ties at the threshold going to the lowest token ids."""
    threshold = torch.topk(z, k).values[-1]
    above = z > threshold
    tied = torch.nonzero(z == threshold).flatten()[: k - int(above.sum())]
    above[tied] = True
    return above


def _ranked(z: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `size` highest entries as (values, ids), by value descending then id ascending."""
    if size == z.numel():
        values, ids = torch.sort(z, descending=True, stable=True)
        return values, ids
    values, ids = torch.topk(z, size)
    ids, perm = torch.sort(ids)  # ascending ids, then a stable sort by value
    values, order = torch.sort(values[perm], descending=True, stable=True)
    return values, ids[order]


def grammar_support(
    scaled: torch.Tensor, params: Sequence[SamplingParams], mask: torch.Tensor, allowed: torch.Tensor | None
) -> torch.Tensor:
    """[R, V] bool: S ∩ G, the grammar's allowed set G ([R, V] bool, all True on rows without
    a grammar; None = no grammar anywhere) applied after top-k/top-p/min-p (`mask` = S).

    S is a prefix of the ranking, so S ∩ G holds G's most likely token whenever it is not
    empty. When it is empty (the truncation kept none of the allowed tokens), the row takes
    top-k/top-p/min-p over z' restricted to G instead: the support is never empty, and the
    greedy token is G's most likely token either way."""
    if allowed is None:
        return mask
    out = mask & allowed
    # amax over the bytes: bool any() over a vocabulary is ~7x slower here.
    for r in torch.nonzero(out.view(torch.uint8).amax(dim=-1) == 0).flatten().tolist():
        within = scaled[r : r + 1].masked_fill(~allowed[r : r + 1], float("-inf"))  # [1, V]
        out[r] = support_mask(within, [params[r]])[0] & allowed[r]
    return out


def restrict(scaled: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """z' restricted to the support S: -inf outside. [R, V]"""
    return scaled.masked_fill(~mask, float("-inf"))


def processed_log_probs(scaled: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[R, V] log p over the support (-inf outside): log_softmax(z' restricted to S)."""
    return row_log_softmax(restrict(scaled, mask))


def raw_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """[R, V] the model's own distribution: log_softmax(z), no penalties, T = 1."""
    return row_log_softmax(logits)


def log_kept_mass(scaled: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[R] logsumexp(z'[S]) - logsumexp(z'); processed = log_softmax(z')[t] - this."""
    return row_logsumexp(scaled.masked_fill(~mask, float("-inf"))) - row_logsumexp(scaled)


def top_n(logprobs: torch.Tensor, n: int) -> list[list[tuple[int, float]]]:
    """Per row, the n largest entries as (token_id, logprob), ties by lower token id."""
    if n <= 0:
        return [[] for _ in range(logprobs.shape[0])]
    n = min(n, logprobs.shape[-1])
    values, _ = torch.topk(logprobs, n, dim=-1)
    out = []
    for r in range(logprobs.shape[0]):
        row, threshold = logprobs[r], values[r, -1]
        above = torch.nonzero(row > threshold).flatten()
        tied = torch.nonzero(row == threshold).flatten()[: n - above.numel()]
        ids = torch.cat([above, tied])
        vals = row.index_select(0, ids)
        # Sort by value descending, then id ascending (ids are ascending within each part).
        ids_sorted, perm = torch.sort(ids)
        vals_sorted = vals[perm]
        _, order = torch.sort(vals_sorted, descending=True, stable=True)
        out.append(list(zip(ids_sorted[order].tolist(), vals_sorted[order].tolist())))
    return out


def uniform(seed: int, step: int) -> float:
    """A uniform in [0, 1) that depends only on (seed, step) (splitmix64)."""
    x = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return (x >> 11) * (1.0 / (1 << 53))


def sample_from(log_p: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw from one row of log p (token-id order, float64 cumulative sum)."""
    cdf = torch.cumsum(torch.exp(log_p.double()), dim=-1)  # [V]
    target = torch.tensor([u * cdf[-1].item()], dtype=torch.float64)
    return int(torch.searchsorted(cdf, target, right=True).clamp_(max=log_p.numel() - 1).item())


def sequence_logprobs(
    logits: torch.Tensor,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    params: SamplingParams,
    allowed: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """What a trainer recomputes for one response: logits [N, V] fp32 at the N output
    positions (row i predicts output_ids[i]). Returns per-token "processed", "raw" and
    "log_kept_mass" tensors [N], using the penalty state each step had when sampled.
    With structured output, `allowed` [N, V] bool is the grammar's allowed set at each
    step (`asyncengine.structured.bitmask.replay_masks` rebuilds it from the output ids)."""
    n = len(output_ids)
    rows = [params] * n
    outs = [list(output_ids[:i]) for i in range(n)]
    penalized = apply_penalties(logits.float(), rows, [prompt_ids] * n, outs)
    scaled = apply_temperature(penalized, rows)
    mask = grammar_support(scaled, rows, support_mask(scaled, rows), allowed)
    target = torch.tensor(list(output_ids), dtype=torch.int64)[:, None]
    return {
        "processed": processed_log_probs(scaled, mask).gather(1, target)[:, 0],
        "raw": raw_log_probs(logits.float()).gather(1, target)[:, 0],
        "log_kept_mass": log_kept_mass(scaled, mask),
    }
