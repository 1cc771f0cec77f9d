"""The grammar-library choice, measured: per-step next-token mask fill for a batch of 64
matchers on the default model's 49,152-token vocabulary, xgrammar vs llguidance (the latter
only if installed; it is not a dependency). Run through `bench/structured.py --masks`.

Two walks over the same JSON schema: "valid" advances each matcher along its own valid
document (64 different ones, the states a real model visits), "random" along random
allowed tokens (the states a random model reaches: long strings, odd numbers), and a
random walk under a regex. Both libraries fill the same [64, 1536] int32 bitmask layout.
"""
from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

SCHEMA = {"type": "object", "required": ["name", "age", "tags", "ok"], "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "ok": {"type": "boolean"}}}
REGEX = r"(\d{1,3}\.){3}\d{1,3}|[a-z ]{0,40}"
WORDS = ["alpha", "beta", "gamma", " x", "Zürich", "42", "hello world", "tab\t", 'q"uote']


def _documents(tok: Any, n: int, eos: int) -> list[list[int]]:
    rng = random.Random(0)
    docs = []
    for _ in range(n):
        d = {"name": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))), "age": rng.randint(-1000, 10**6),
             "tags": [rng.choice(WORDS) for _ in range(rng.randint(0, 4))], "ok": rng.random() < 0.5}
        text = json.dumps(d, indent=rng.choice([None, 2]), ensure_ascii=False)
        docs.append(tok.encode(text, add_special_tokens=False) + [eos])
    return docs


def _walk(fill: Callable[[list[int]], None], accept: Callable[[int, int], None], docs: list[list[int]]) -> float:
    """Mean ms per step of fill(rows still going) along the documents."""
    times = []
    for s in range(max(map(len, docs))):
        live = [i for i, d in enumerate(docs) if s < len(d)]
        t = time.perf_counter()
        fill(live)
        times.append(time.perf_counter() - t)
        for i in live:
            accept(i, docs[i][s])
    return 1e3 * statistics.mean(times)


def _random_docs(make_x: Callable[[], Any], vocab: int, n: int, steps: int = 40) -> list[list[int]]:
    """Token walks of random allowed tokens (drawn from xgrammar's masks), replayed on both."""
    from asyncengine.structured.bitmask import unpack

    rng = random.Random(1)
    ms = [make_x() for _ in range(n)]
    bm = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
    docs: list[list[int]] = [[] for _ in range(n)]
    for i, m in enumerate(ms):
        for _ in range(steps):
            if m.is_terminated():
                break
            m.fill_next_token_bitmask(bm, 0)
            t = rng.choice(torch.nonzero(unpack(bm, vocab)[0]).flatten().tolist())
            assert m.accept_token(t)
            docs[i].append(t)
    return docs


def compare(model: str | None, batch: int) -> None:
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from asyncengine.model_files import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model(model)))
    vocab, eos = 49152, tok.eos_token_id
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[eos]))
    grammars = {"json": compiler.compile_json_schema(json.dumps(SCHEMA)), "regex": compiler.compile_regex(REGEX)}
    walks = {
        "json valid": ("json", _documents(tok, batch, eos)),
        "json random": ("json", _random_docs(lambda: xgr.GrammarMatcher(grammars["json"]), vocab, batch)),
        "regex random": ("regex", _random_docs(lambda: xgr.GrammarMatcher(grammars["regex"]), vocab, batch)),
    }
    bm = torch.zeros(batch, (vocab + 31) // 32, dtype=torch.int32)
    llg = _llguidance(tok, vocab)
    print(f"per-step mask fill, batch {batch}, vocab {vocab}, serial, mean ms (3 rounds, alternating)")
    for rnd in range(3):
        for name, (kind, docs) in walks.items():
            ms = [xgr.GrammarMatcher(grammars[kind]) for _ in docs]
            x = _walk(lambda live: [ms[i].fill_next_token_bitmask(bm, i) for i in live],
                      lambda i, t: ms[i].accept_token(t), docs)
            line = f"  round {rnd + 1} {name:12s} xgrammar {x:6.3f}"
            if llg is not None:
                line += f"  llguidance {llg(kind, docs, bm):6.3f}"
            print(line, flush=True)


def _llguidance(tok: Any, vocab: int) -> Callable[[str, list[list[int]], torch.Tensor], float] | None:
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError:
        print("  (llguidance not installed: xgrammar only)")
        return None
    lt = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    sources = {"json": llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA)),
               "regex": llguidance.LLMatcher.grammar_from_regex(REGEX)}

    def run(kind: str, docs: list[list[int]], bm: torch.Tensor) -> float:
        ms = [llguidance.LLMatcher(lt, sources[kind]) for _ in docs]
        return _walk(lambda live: [llguidance.torch.fill_next_token_bitmask(ms[i], bm, i) for i in live],
                     lambda i, t: ms[i].consume_token(t), docs)

    return run
