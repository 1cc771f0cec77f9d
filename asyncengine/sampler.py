"""Turns fp32 logits into tokens and logprobs under the logprob contract."""
from __future__ import annotations

import torch

from asyncengine import logprobs as L
from asyncengine.outputs import PromptLogprobs, SampleResult
from asyncengine.request import Request


def sample(logits: torch.Tensor, requests: list[Request]) -> list[SampleResult]:
    """logits: [R, V] fp32, one row per request (its last position)."""
    params = [r.params for r in requests]
    penalized = L.apply_penalties(
        logits, params, [r.prompt_token_ids for r in requests], [r.output_token_ids for r in requests]
    )
    scaled = L.apply_temperature(penalized, params)  # [R, V]
    mask = L.support_mask(scaled, params)  # [R, V]
    processed = L.processed_log_probs(scaled, mask)  # [R, V]
    need_raw = any(p.logprobs_mode == "raw" or p.return_raw_logprob for p in params)
    raw = L.raw_log_probs(logits) if need_raw else None
    kept = L.log_kept_mass(scaled, mask) if any(p.return_log_kept_mass for p in params) else None

    results = []
    for r, req in enumerate(requests):
        sp = req.params
        if sp.greedy:
            token = int(torch.argmax(scaled[r]).item())  # first maximum = lowest id
        else:
            token = L.sample_from(processed[r], L.uniform(req.seed, req.num_output_tokens))
        mode_row = raw[r] if sp.logprobs_mode == "raw" and raw is not None else processed[r]
        res = SampleResult(token_id=token, logprob=float(mode_row[token].item()))
        if sp.logprobs is not None:
            res.top_logprobs = L.top_n(mode_row[None], sp.logprobs)[0]
        if sp.return_raw_logprob and raw is not None:
            res.raw_logprob = float(raw[r, token].item())
        if sp.return_log_kept_mass and kept is not None:
            res.log_kept_mass = float(kept[r].item())
        results.append(res)
    return results


def prompt_logprobs(logits: torch.Tensor, targets: list[int], num_top: int) -> PromptLogprobs:
    """logits: [P, V] fp32 at prompt positions; targets: the next prompt token of each.
    Raw (T = 1, no penalties), as scoring and lm-eval expect."""
    log_p = L.raw_log_probs(logits)  # [P, V]
    idx = torch.tensor(targets, dtype=torch.int64)[:, None]
    values = log_p.gather(1, idx)[:, 0].tolist()
    top = L.top_n(log_p, num_top) if num_top > 0 else None
    return PromptLogprobs(logprobs=values, top_logprobs=top)
