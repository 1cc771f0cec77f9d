"""`asyncengine parity` matches with the right config and flags each migration misconfiguration."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from asyncengine.cli import build_parser, config_from_args
from asyncengine.parity import report, run_parity


def parity(model_dir: Path, tmp_path: Path, *extra: str) -> int:
    """Tiny models are judged at 1e-5 (their fp32 noise floor, tests/tiny_models.py), not
    the CLI's default 1e-4 for real checkpoints."""
    args = build_parser().parse_args(["parity", "--model", str(model_dir), "--num-prompts", "4", "--max-tokens", "12",
                                      "--num-kv-blocks", "64", "--plot", str(tmp_path / "h.png"),
                                      "--tolerance", "1e-5", *extra])
    assert isinstance(args, argparse.Namespace)
    return run_parity(args, config_from_args(args))


@pytest.mark.parametrize("extra,ok", [
    ((), True),
    (("--top-p", "0.9", "--top-k", "40"), True),
    (("--update-weights", "proper"), True),
    (("--top-p", "0.8", "--top-k", "30", "--reference", "contract"), True),
    (("--logprobs-mode", "raw"), False),
    (("--dtype", "bfloat16", "--lm-head-dtype", "bfloat16"), False),
    (("--update-weights", "stale"), False),
])
def test_parity_verdicts(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple,
                         ok: bool) -> None:
    code = parity(llama_dir, tmp_path, *extra)
    out = capsys.readouterr().out
    assert (code == 0) == ok, out
    [verdict] = [line for line in out.splitlines() if line.startswith("verdict")]
    assert verdict.split()[5] == ("MATCH" if ok else "MISMATCH:") and "<= 1e-05" in verdict
    reference = "asyncengine.logprobs" if "contract" in extra else "float64 formula"
    assert f"trainer reference: HF fp32 logits, then {reference}" in out
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_report_metrics() -> None:
    rollout = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    trainer = torch.tensor([-1.0, -2.5, -0.5, -3.0005])
    rep = report(rollout, trainer)
    assert rep.num_tokens == 4 and rep.max_abs == pytest.approx(0.5)
    assert rep.outside_20pct == pytest.approx(0.25)  # exp(-0.5) = 0.61
    assert rep.outside_01pct == pytest.approx(0.25)  # exp(0.0005) = 1.0005 is inside
    assert rep.kl_k1 == pytest.approx((0.5 + 0.0005) / 4, rel=1e-3)
    assert not rep.ok
    assert report(trainer, trainer, tolerance=1e-5).ok and not report(trainer + 2e-5, trainer, tolerance=1e-5).ok
