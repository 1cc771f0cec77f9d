"""The logprob contract with a grammar: S ∩ G after top-k/top-p/min-p. Processed logprobs
and log kept mass equal an independent float64 recompute (numpy, our own bit unpacking of
a separate xgrammar matcher), and asyncengine.logprobs reproduces them bitwise."""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
import xgrammar as xgr

import asyncengine.sampler as sampler_module
from asyncengine import logprobs as L
from asyncengine.engine_core import EngineCore
from asyncengine.sampling_params import SamplingParams
from asyncengine.structured import StructuredSpec
from asyncengine.structured.bitmask import replay_masks
from tests.invariance_harness import Req, run
from tests.test_structured import SCHEMA, engine  # noqa: F401 (fixture)

# fp32 logits, fp32 arithmetic in the engine vs float64 here: a few ulps of values ~10.
TOL = 1e-5
PARAMS = [
    dict(temperature=0.7),
    dict(temperature=1.2, top_k=20),
    dict(temperature=0.9, top_p=0.8, min_p=0.02),
    dict(temperature=1.0, top_k=1),  # S ∩ G is mostly empty: the truncation over G decides
    dict(temperature=0.0),
]


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[str, int], torch.Tensor]:
    """(request id, output index) -> the fp32 logits row the sampler got."""
    rows: dict[tuple[str, int], torch.Tensor] = {}
    real = sampler_module.sample

    def recording(logits: torch.Tensor, requests: list[Any], stats: Any = None) -> Any:
        for r, req in enumerate(requests):
            rows[(req.request_id, req.num_output_tokens)] = logits[r].clone()
        return real(logits, requests, stats)

    monkeypatch.setattr(sampler_module, "sample", recording)
    return rows


def _independent_allowed(engine: EngineCore, ids: list[int]) -> np.ndarray:
    """[N, V] bool from a separately built xgrammar matcher, unpacked bit by bit in numpy."""
    vocab = engine.model_info.vocab_size
    info = xgr.TokenizerInfo.from_huggingface(engine.tokenizer, vocab_size=vocab, stop_token_ids=[2])
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    out = []
    for t in ids:
        matcher.fill_next_token_bitmask(bitmask)
        words = bitmask[0].numpy().astype(np.int64) & 0xFFFFFFFF
        out.append([(int(words[i // 32]) >> (i % 32)) & 1 == 1 for i in range(vocab)])
        assert matcher.accept_token(t)
    return np.array(out)


def _support64(z: np.ndarray, sp: dict[str, float], allowed: np.ndarray) -> np.ndarray:
    """S ∩ G in float64; when empty, top-k/top-p/min-p over z restricted to G."""
    def truncate(zz: np.ndarray) -> np.ndarray:
        order = sorted(range(len(zz)), key=lambda i: (-zz[i], i))
        keep = np.isfinite(zz)
        k = int(sp.get("top_k", 0))
        if k > 0:
            keep &= np.isin(np.arange(len(zz)), order[:k])
        p = np.where(keep, np.exp(zz - zz[keep].max()), 0.0)
        p /= p.sum()
        if sp.get("top_p", 1.0) < 1.0:
            mass, top = 0.0, np.zeros_like(keep)
            for i in order:
                if keep[i] and mass < sp["top_p"]:
                    top[i] = True
                    mass += p[i]
            keep &= top
        if sp.get("min_p", 0.0) > 0.0:
            keep &= zz - zz[keep].max() >= np.log(sp["min_p"])
        return keep

    s = truncate(z) & allowed
    return s if s.any() else truncate(np.where(allowed, z, -np.inf)) & allowed


def _lse(x: np.ndarray) -> float:
    m = x.max()
    return float(m + np.log(np.exp(x - m).sum()))


@pytest.mark.parametrize("sp", PARAMS)
def test_processed_logprobs_match_float64_over_masked_support(
    engine: EngineCore, captured: dict[tuple[str, int], torch.Tensor], sp: dict[str, float]
) -> None:
    spec = StructuredSpec.json_schema(SCHEMA, any_whitespace=False)
    reqs = [Req(f"lp{s}", (1, 4 + s, 8), SamplingParams(seed=s, max_tokens=200, structured=spec,
                                                         return_log_kept_mass=True, **sp)) for s in range(4)]
    out = run(engine, [*reqs, Req("free", (5, 6), SamplingParams(seed=1, max_tokens=30, **sp))])
    for r in reqs:
        ids = list(out[r.rid].token_ids)
        allowed = _independent_allowed(engine, ids)
        for i, t in enumerate(ids):
            z = captured[(r.rid, i)].double().numpy()
            zs = z / (sp["temperature"] if sp["temperature"] > 0 else 1.0)
            s = _support64(zs, sp, allowed[i])
            assert s[t], (i, t)  # the sampled token is in S ∩ G
            if sp["temperature"] == 0:
                assert t == int(np.flatnonzero(allowed[i])[np.argmax(zs[allowed[i]])])
            want = zs[t] - _lse(zs[s])
            assert abs(out[r.rid].logprobs[i] - want) <= TOL, (i, out[r.rid].logprobs[i], want)


def test_trainer_mirror_is_bitwise(engine: EngineCore, captured: dict[tuple[str, int], torch.Tensor]) -> None:
    """logprobs.sequence_logprobs with the replayed allowed sets returns the engine's bits."""
    spec = StructuredSpec.json_schema(SCHEMA, any_whitespace=False)
    for s, sp in enumerate(PARAMS):
        params = SamplingParams(seed=s, max_tokens=200, structured=spec, return_log_kept_mass=True,
                                return_raw_logprob=True, **sp)  # type: ignore[arg-type]
        prompt = (1, 9, 3 + s)
        rid = f"m{s}"
        engine.add_request(rid, list(prompt), params)
        got: dict[str, list[Any]] = {"ids": [], "lp": [], "kept": [], "raw": []}
        while engine.has_unfinished():
            for o in engine.step():
                got["ids"] += o.token_ids
                got["lp"] += o.logprobs
                got["kept"] += o.log_kept_mass or []
                got["raw"] += o.raw_logprobs or []
        logits = torch.stack([captured[(rid, i)] for i in range(len(got["ids"]))])  # [N, V]
        allowed = replay_masks(engine.structured.backend.start(spec), got["ids"], engine.model_info.vocab_size)
        mirror = L.sequence_logprobs(logits, prompt, got["ids"], params, allowed=allowed)
        assert mirror["processed"].tolist() == got["lp"]
        assert mirror["log_kept_mass"].tolist() == got["kept"]
        assert mirror["raw"].tolist() == got["raw"]  # raw is the model's own: no mask


def test_log_kept_mass_includes_the_mask(engine: EngineCore, captured: dict[tuple[str, int], torch.Tensor]) -> None:
    spec = StructuredSpec.json_schema(SCHEMA, any_whitespace=False)
    params = SamplingParams(seed=3, max_tokens=200, structured=spec, return_log_kept_mass=True, temperature=0.8)
    engine.add_request("kept", [1, 2, 3], params)
    kept: list[float] = []
    ids: list[int] = []
    while engine.has_unfinished():
        for o in engine.step():
            kept += o.log_kept_mass or []
            ids += o.token_ids
    allowed = _independent_allowed(engine, ids)
    for i in range(len(ids)):
        zs = captured[("kept", i)].double().numpy() / 0.8
        assert abs(kept[i] - (_lse(zs[allowed[i]]) - _lse(zs))) <= TOL
    assert min(kept) < -1.0  # the grammar cuts real mass, unlike no truncation (0)
