"""Turns fp32 logits into tokens and logprobs under the logprob contract."""
from __future__ import annotations

import torch

from asyncengine import logprobs as L
from asyncengine.outputs import PromptLogprobs, SampleResult
from asyncengine.request import Request
from asyncengine.structured.bitmask import allowed_tokens


def reads_logits_as_is(requests: list[Request]) -> bool:
    """Whether sampling these rows reads the logits themselves (no penalty, T = 1 or
    greedy, no top-k/top-p/min-p, no grammar): then `sample` can take the normalizer and
    greedy tokens the caller computed with its non-finite check (`L.row_stats`). A hint
    only: `sample` checks that its rows are the logits before it uses them."""
    return all(r.grammar is None and (r.params.greedy or r.params.temperature == 1.0)
               and not r.params.penalized and not r.params.filtered for r in requests)


def sample(logits: torch.Tensor, requests: list[Request], stats: L.RowStats | None = None) -> list[SampleResult]:
    """logits: [R, V] fp32, one row per request (its last position). stats: L.row_stats
    of these logits, when the caller has it (used only where the rows sample from the
    logits as they are)."""
    params = [r.params for r in requests]
    penalized = L.apply_penalties(
        logits, params, [r.prompt_token_ids for r in requests], [r.output_token_ids for r in requests]
    )
    scaled = L.apply_temperature(penalized, params)  # [R, V]
    # The grammar's allowed set G comes after top-k/top-p/min-p: S ∩ G (logprobs.grammar_support).
    outputs = [r.output_token_ids if r.grammar is not None else () for r in requests]
    allowed = allowed_tokens([r.grammar for r in requests], outputs, logits.shape[1], logits.device)
    filters = allowed is not None or any(p.filtered for p in params)
    want_kept = any(p.return_log_kept_mass for p in params)
    # S ∩ G [R, V]; when no row filters it is every token, built only for log_kept_mass
    # (a [R, V] fill: ~0.1 ms of a 64-row decode step at vocab 49152).
    mask = L.grammar_support(scaled, params, L.support_mask(scaled, params), allowed) if filters or want_kept else None
    # z' on the support; when no row filters, z' itself (masked_fill of nothing is a copy).
    restricted = L.restrict(scaled, mask) if mask is not None and filters else scaled  # [R, V]
    # processed_log_probs = restricted - lse, row by row below: only the rows and entries
    # that are read get materialized, with the same bits.
    if restricted is scaled:  # no filter: the normalizer and the greedy tokens from one read
        if stats is None or scaled is not logits:
            stats = L.row_stats(scaled)
        lse, greedy = stats.lse, stats.argmax  # [R], [R]
    else:
        lse, greedy = L.row_logsumexp(restricted), L.row_argmax(scaled)
    need_raw = any(p.logprobs_mode == "raw" or p.return_raw_logprob for p in params)
    raw = L.raw_log_probs(logits) if need_raw else None
    kept = L.log_kept_mass(scaled, mask) if mask is not None and want_kept else None
    greedy_tokens = greedy.tolist()  # first maximum = lowest id
    for r, req in enumerate(requests):
        if req.grammar is not None and req.params.greedy:  # the most likely allowed token
            greedy_tokens[r] = int(L.row_argmax(restricted[r : r + 1])[0])

    tokens, rows = [], []
    for r, req in enumerate(requests):
        sp = req.params
        processed_row = restricted[r] - lse[r] if not sp.greedy or sp.logprobs is not None else None
        rows.append(processed_row)
        tokens.append(greedy_tokens[r] if sp.greedy else
                      L.sample_from(processed_row, L.uniform(req.seed, req.num_output_tokens)))
    # Every row's processed logprob of its token in one gather: the same fp32 subtraction
    # per row as restricted[r, token] - lse[r], without 2 x R scalar tensor ops.
    chosen = torch.tensor(tokens, dtype=torch.int64)[:, None]  # [R, 1]
    processed = (restricted.gather(1, chosen)[:, 0] - lse).tolist()
    results = []
    for r, req in enumerate(requests):
        sp, token = req.params, tokens[r]
        if sp.logprobs_mode == "raw" and raw is not None:
            mode_row, logprob = raw[r], float(raw[r, token].item())
        else:
            mode_row, logprob = rows[r], processed[r]
        res = SampleResult(token_id=token, logprob=logprob)
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
