"""The RL loop's reward task: the last number of a reply is its answer."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asyncengine.rl.check import load_run, save_runs
from asyncengine.rl.loop import RunConfig, RunResult
from asyncengine.rl.metrics import StepMetrics
from asyncengine.rl.task import Problem, problems
from asyncengine.rl.trainer import Rollout, Trainer
from asyncengine.sampling_params import SamplingParams


def test_reward_reads_the_last_number() -> None:
    p = Problem(3, 5)
    assert p.question == "What is 3 + 5?"
    assert p.reward("To add 3 and 5, we get 3 + 5 = 8.") == 1.0
    assert p.reward("8") == 1.0
    # Cut off after restating the problem: the last number is an operand, scored by its distance.
    assert p.reward("To add 3 and 5, we add 3 + 5") == 0.5 / (1 + 3)
    assert p.reward("The answer is 9, not 8") == 1.0
    assert p.reward("The answer is 8, not 9") == 0.5 / 2
    assert p.reward("I can't say.") == 0.0
    assert Problem(0, 0).reward("-1") == 0.25


def test_problems_are_a_function_of_seed_and_step() -> None:
    assert problems(3, 5, seed=1) == problems(3, 5, seed=1)
    assert problems(3, 5, seed=1) != problems(4, 5, seed=1)
    assert all(0 <= q.a <= 7 and 0 <= q.b <= 7 for q in problems(0, 50, max_operand=7))


def test_saved_runs_load_back(tmp_path: Path) -> None:
    """rl-check --json, then --learn-json: the learning run comes back as it was."""
    m = StepMetrics(0, 12, 1e-6, 2e-5, 3e-11, 0.0, 0.25, 0.5, {1: 8, 2: 4})
    run = RunResult(RunConfig("learn", steps=1, lr=2e-5), {"right": [m], "raw": [m]}, [0.4], 12.5)
    save_runs({"learn": run}, tmp_path / "runs.json")
    back = load_run(tmp_path / "runs.json", "learn")
    assert back == run
    with pytest.raises(SystemExit, match="no run named"):
        load_run(tmp_path / "runs.json", "zero-lr")


def test_off_policy_tokens_outside_top_p_leave_the_weights_finite(llama_dir: Path) -> None:
    """A token outside the trainer's current top-p support (sampled by older weights) has
    logprob -inf: the GRPO step must skip it, not write NaN into every weight."""
    params = SamplingParams(max_tokens=4, temperature=1.0, top_p=0.5)
    trainer = Trainer(llama_dir, 1e-3, params)
    prompt = [5, 9, 13]
    with torch.no_grad():
        logits = trainer.model(torch.tensor([prompt])).logits[0, -1]
    top, bottom = int(logits.argmax()), int(logits.argmin())
    good = Rollout(prompt, 0, token_ids=[top], weight_versions=[0], reward=1.0)
    bad = Rollout(prompt, 0, token_ids=[bottom], weight_versions=[0], reward=0.0)  # outside the nucleus
    lp = trainer.score(bad, per_token_versions=False)
    assert torch.isneginf(lp).all()  # the case this guards against
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_step([good, bad])
    after = list(trainer.model.parameters())
    assert all(bool(torch.isfinite(p).all()) for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the in-support token still trained
