"""The RL loop's controls, short (tiny model, few steps): the right configuration is exact
and each misconfiguration is flagged (>= 100x), through real server processes and gloo."""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from asyncengine.rl.check import FLAG_RATIO, add_rl_check_args, controls, run_all, verdict


def test_controls_flag_each_misconfiguration(llama_dir: Path, tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    add_rl_check_args(p)
    a = p.parse_args(["--steps", "2", "--lr-steps", "3", "--small-lr", "1e-3", "--num-prompts", "2",
                      "--group-size", "2", "--max-tokens", "8"])
    results = asyncio.run(run_all(a, llama_dir, tmp_path))
    pairs = controls(results)
    names = [c.name for c, _ in pairs]
    assert names == ["right configuration", "raw logprobs, trainer applies T/top-p", "bf16 lm_head",
                     "right configuration", "prefix cache kept across updates", "right: per-token versions",
                     "one version per sequence", "one version: tokens before the switch",
                     "one version: tokens after the switch"]
    for c, right in pairs:
        line, ok = verdict(c, right)
        assert ok, line
        if right is None:  # the right configurations: equal at every step
            assert all(m.max_abs <= 1e-4 for m in c.steps), line
        elif "before the switch" not in c.name:
            assert c.max_abs >= FLAG_RATIO * right.max_abs, line
    zero = results["zero-lr"].steps["right"]
    assert all(m.kl_k3 <= 1e-8 for m in zero)
    # Weights synced every step through the protocol: the version goes up by one per step.
    versions = [sorted(m.tokens_per_version) for m in results["small-lr-sync"].steps["right"]]
    assert [v[0] for v in versions] == list(range(versions[0][0], versions[0][0] + 3))
    inflight = results["small-lr-inflight"].steps["right"]
    assert all(len(m.tokens_per_version) == 2 for m in inflight[1:])  # sequences did switch versions
