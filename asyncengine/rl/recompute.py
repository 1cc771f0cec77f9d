"""The trainer's exact recompute of a sequence that switched weight versions mid-flight.

In keep mode (PipelineRL style) a request in flight during an update keeps the KV its
positions got from the old weights and goes on with the new ones. Token out[j] was
sampled from the forward at position P+j-1 (P = prompt length) under weight_versions[j],
attending to KV of mixed ages: the prompt's KV was computed in the prefill step (the
step that sampled out[0], version weight_versions[0]); token out[j]'s KV in the step that
sampled out[j+1] (version weight_versions[j+1]). Recomputing every token with one version
per sequence gets every token after the switch wrong; this module recomputes each run of
positions with the weights of the step that computed it, reusing the cache of the earlier
runs, as the engine did.

A preemption (or a recompute-mode update) drops a request's KV; the engine later
recomputes prompt + outputs so far with the then current weights, so the tokens after it
attend to KV of other versions than the tokens before. The engine reports what happened
as the request's `kv_epochs` (RequestOutput / CompletionResult, `kv_epochs` over HTTP
with return_weight_versions): (start, end, version) runs of KV positions in the order
computed. Given them, the recompute replays exactly that: each run forwarded by its
version's model on the cache as it stood (cut back to `start` first), and each token
scored from the step that sampled it, the first one whose run reached its position.
Without them it assumes no preemption (the KV epochs then follow from weight_versions).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from asyncengine.logprobs import sequence_logprobs
from asyncengine.sampling_params import SamplingParams


def position_versions(num_prompt: int, weight_versions: Sequence[int]) -> list[int]:
    """The weight version that computed each input position 0 .. P+N-2 (the last token
    is never an input)."""
    if not weight_versions:
        return []
    return [weight_versions[0]] * num_prompt + list(weight_versions[1:])


def _runs(versions: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs [a, b) of equal version: (a, b, version)."""
    runs: list[tuple[int, int, int]] = []
    for i, v in enumerate(versions):
        if runs and runs[-1][2] == v:
            runs[-1] = (runs[-1][0], i + 1, v)
        else:
            runs.append((i, i + 1, v))
    return runs


def default_epochs(num_prompt: int, weight_versions: Sequence[int]) -> list[tuple[int, int, int]]:
    """The KV epochs of a request that was never preempted (position_versions in runs)."""
    return _runs(position_versions(num_prompt, weight_versions))


@torch.no_grad()
def mixed_version_logits(models: Mapping[int, Any], prompt: Sequence[int], output: Sequence[int],
                         weight_versions: Sequence[int],
                         kv_epochs: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """fp32 logits [N, V] that produced output[0..N-1]: the engine's KV epochs replayed,
    each run forwarded by the HF model of its version (models: version -> HF causal LM)."""
    from transformers import DynamicCache

    num_prompt, n = len(prompt), len(output)
    epochs = [tuple(e) for e in kv_epochs] if kv_epochs is not None else default_epochs(num_prompt, weight_versions)
    missing = sorted({v for _, _, v in epochs} - set(models))
    if missing:
        raise KeyError(f"no model for weight versions {missing}")
    ids = torch.tensor([list(prompt) + list(output)])  # [1, P + N]
    cache = DynamicCache()
    rows: list[torch.Tensor] = []
    for a, b, v in epochs:
        if a > cache.get_seq_length() or b > ids.shape[1]:
            raise ValueError(f"KV epoch {(a, b, v)} does not follow the ones before it (cache of "
                             f"{cache.get_seq_length()} positions, {ids.shape[1]} tokens)")
        if a == 0:  # a recompute from scratch (a preemption)
            cache = DynamicCache()
        elif a < cache.get_seq_length():  # a recompute from `a` replaces the KV past it
            cache.crop(a - cache.get_seq_length())  # negative: drop that many (transformers 4 and 5)
        logits = models[v](input_ids=ids[:, a:b], cache=cache, use_cache=True).logits[0].float()  # [b - a, V]
        # Position p's logits sampled output[p + 1 - P] if that was the next token to sample.
        for p in range(max(a, num_prompt - 1 + len(rows)), b):
            if p + 1 - num_prompt == len(rows) < n:
                rows.append(logits[p - a])
    if len(rows) != n:
        raise ValueError(f"the KV epochs account for {len(rows)} of {n} sampled tokens")
    return torch.stack(rows) if rows else torch.empty(0, 0)


def mixed_version_logprobs(models: Mapping[int, Any], prompt: Sequence[int], output: Sequence[int],
                           weight_versions: Sequence[int], params: SamplingParams,
                           kv_epochs: Sequence[Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """Per-token "processed", "raw" and "log_kept_mass" [N] of the exact mixed-version
    recompute (the contract's functions on mixed_version_logits); pass the request's
    kv_epochs where it may have been preempted."""
    logits = mixed_version_logits(models, prompt, output, weight_versions, kv_epochs)
    return sequence_logprobs(logits, list(prompt), list(output), params)
