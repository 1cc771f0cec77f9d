"""`asyncengine bench`: runs end to end on a tiny model, reports consistent numbers, rejects bad args."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from asyncengine.benchmark import length_range, random_prompts
from asyncengine.cli import main

# A small KV pool: the default 2 GB budget would be allocated for nothing.
ENGINE = ["--num-kv-blocks", "64"]


def bench(model_dir: Path, *extra: str) -> int:
    return main(["bench", "--model", str(model_dir), *ENGINE, *extra])


def test_bench_end_to_end(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "r.json"
    code = bench(llama_dir, "--num-prompts", "3", "--input-len", "8", "--output-len", "4",
                 "--output-json", str(out_json))
    assert code == 0
    r = json.loads(out_json.read_text())
    assert set(r) == {
        "model", "dtype", "lm_head_dtype", "deterministic", "num_requests", "input_len", "output_len",
        "range_ratio", "prompt_tokens", "generated_tokens", "total_tokens", "elapsed_s", "requests_per_s",
        "generated_tokens_per_s", "total_tokens_per_s",
    }
    assert (r["num_requests"], r["prompt_tokens"], r["generated_tokens"], r["total_tokens"]) == (3, 24, 12, 36)
    assert r["dtype"] == "float32" and r["deterministic"] is True
    assert r["elapsed_s"] > 0
    for key, count in (("requests_per_s", 3), ("generated_tokens_per_s", 12), ("total_tokens_per_s", 36)):
        assert r[key] > 0
        assert r[key] * r["elapsed_s"] == pytest.approx(count)
    out = capsys.readouterr().out
    assert "requests/s" in out and "generated tokens/s" in out and "total tokens/s" in out
    assert "dtype=float32" in out and "deterministic=True" in out


def test_bench_range_ratio_and_flags(llama_dir: Path, tmp_path: Path) -> None:
    out_json = tmp_path / "sub" / "r.json"  # a missing parent directory is created
    code = bench(llama_dir, "--num-prompts", "4", "--input-len", "10", "--output-len", "3", "--range-ratio", "0.5",
                 "--warmup", "0", "--non-deterministic", "--output-json", str(out_json))
    assert code == 0
    r = json.loads(out_json.read_text())
    assert r["generated_tokens"] == 12 and r["deterministic"] is False
    assert 4 * 5 <= r["prompt_tokens"] <= 4 * 15


@pytest.mark.parametrize("flag,value,message", [
    ("--output-len", "0", "must be >= 1"),
    ("--input-len", "0", "must be >= 1"),
    ("--num-prompts", "0", "must be >= 1"),
    ("--warmup", "-1", "must be >= 0"),
    ("--range-ratio", "1.0", "must be in [0, 1)"),
    ("--range-ratio", "-0.1", "must be in [0, 1)"),
    ("--output-len", "x", "invalid int value"),
])
def test_bench_rejects_bad_args(llama_dir: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str,
                                message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        bench(llama_dir, flag, value)
    assert exc.value.code == 2  # argparse's usage error, before any engine is built
    err = capsys.readouterr().err
    assert flag in err and message in err


@pytest.mark.parametrize("extra,longest", [
    (("--max-model-len", "16", "--input-len", "8", "--output-len", "9"), 8),
    (("--max-model-len", "16", "--input-len", "8", "--output-len", "4", "--range-ratio", "0.75"), 14),
    (("--input-len", "500", "--output-len", "13"), 500),  # the tiny model's 512 positions
])
def test_bench_rejects_too_long(llama_dir: Path, extra: tuple[str, ...], longest: int) -> None:
    with pytest.raises(SystemExit) as exc:
        bench(llama_dir, "--num-prompts", "1", *extra)
    message = str(exc.value.code)
    assert "exceeds the model's max length" in message and f"longest prompt ({longest} tokens" in message


def test_bench_fails_when_a_request_stops_early(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from asyncengine.llm import LLM

    generate = LLM.generate

    def truncated(self: LLM, *args: object, **kwargs: object) -> list:
        results = generate(self, *args, **kwargs)
        results[-1].token_ids.pop()
        return results

    monkeypatch.setattr(LLM, "generate", truncated)
    with pytest.raises(RuntimeError, match="did not generate exactly 4 tokens"):
        bench(llama_dir, "--num-prompts", "2", "--input-len", "4", "--output-len", "4", "--warmup", "0")


def test_random_prompts_are_seeded_and_in_range() -> None:
    lengths = length_range(20, 0.5)
    assert lengths == (10, 30)
    a = random_prompts(16, lengths, 384, random.Random(7))
    assert a == random_prompts(16, lengths, 384, random.Random(7))
    assert a != random_prompts(16, lengths, 384, random.Random(8))
    assert all(10 <= len(p) <= 30 for p in a)
    assert all(100 <= t < 284 for p in a for t in p)
    assert length_range(1, 0.9) == (1, 1)
