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

Assumes the request was never preempted (a preemption recomputes its KV with the then
current weights) and that its prompt was prefilled within one weight version.
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


@torch.no_grad()
def mixed_version_logits(models: Mapping[int, Any], prompt: Sequence[int], output: Sequence[int],
                         weight_versions: Sequence[int]) -> torch.Tensor:
    """fp32 logits [N, V] that produced output[0..N-1], each run of positions forwarded by
    the HF model of the version that computed it (models: version -> HF causal LM)."""
    from transformers import DynamicCache

    versions = position_versions(len(prompt), weight_versions)
    ids = torch.tensor([list(prompt) + list(output)])  # [1, P + N]
    missing = sorted(set(versions) - set(models))
    if missing:
        raise KeyError(f"no model for weight versions {missing}")
    cache = DynamicCache()
    rows = []
    for a, b, v in _runs(versions):
        out = models[v](input_ids=ids[:, a:b], cache=cache, use_cache=True)
        rows.append(out.logits[0].float())  # [b - a, V]
    logits = torch.cat(rows)  # [P + N - 1, V]
    return logits[len(prompt) - 1 :]


def mixed_version_logprobs(models: Mapping[int, Any], prompt: Sequence[int], output: Sequence[int],
                           weight_versions: Sequence[int], params: SamplingParams) -> dict[str, torch.Tensor]:
    """Per-token "processed", "raw" and "log_kept_mass" [N] of the exact mixed-version
    recompute (the contract's functions on mixed_version_logits)."""
    logits = mixed_version_logits(models, prompt, output, weight_versions)
    return sequence_logprobs(logits, list(prompt), list(output), params)
