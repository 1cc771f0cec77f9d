"""The trainer of the RL loop: HF transformers in fp32 on the CPU, GRPO-style updates.

It recomputes every rollout token's logprob in the trainer's own way (the processed
distribution: temperature and top-p applied, `asyncengine.logprobs`), either exactly per
token version (asyncengine/rl/recompute.py) or, the misconfiguration, with one version
per sequence, and takes one policy-gradient step per batch with group-normalized rewards.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asyncengine.logprobs import sequence_logprobs
from asyncengine.rl.recompute import mixed_version_logprobs
from asyncengine.sampling_params import SamplingParams


@dataclass(slots=True)
class Rollout:
    prompt: list[int]
    group: int  # index of its prompt: GRPO normalizes rewards within a group
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # what the engine returned
    raw_logprobs: list[float] = field(default_factory=list)  # the engine's raw mode, same tokens
    weight_versions: list[int] = field(default_factory=list)
    text: str = ""
    reward: float = 0.0


class Trainer:
    def __init__(self, model_dir: Path, lr: float, params: SamplingParams) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model.eval()  # no dropout: the recompute must be the policy itself
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.params = params
        self.lr = lr
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr) if lr > 0 else None
        # weight version -> model: the current one, and a snapshot of the one before it
        # (keep-mode rollouts that switched versions need both).
        self.versions: dict[int, Any] = {0: self.model}

    def chat_prompt(self, system: str, user: str) -> list[int]:
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    @torch.no_grad()
    def score(self, r: Rollout, per_token_versions: bool) -> torch.Tensor:
        """The trainer's processed logprobs [N] of the rollout's tokens."""
        if per_token_versions:
            return mixed_version_logprobs(self.versions, r.prompt, r.token_ids, r.weight_versions,
                                          self.params)["processed"]
        model = self.versions[r.weight_versions[0]]  # the bug: "the version the sequence started with"
        logits = model(torch.tensor([r.prompt + r.token_ids])).logits[0, len(r.prompt) - 1 : -1]
        return sequence_logprobs(logits, r.prompt, r.token_ids, self.params)["processed"]

    def train_step(self, rollouts: Sequence[Rollout]) -> float:
        """One GRPO step (token-mean loss, rewards normalized per group); the loss. No-op at LR 0."""
        if self.opt is None:
            return 0.0
        adv = advantages(rollouts)
        num_tokens = sum(len(r.token_ids) for r in rollouts)
        total = 0.0
        self.opt.zero_grad(set_to_none=True)
        for r, a in zip(rollouts, adv):
            if a == 0.0 or not r.token_ids:
                continue  # no signal in a group where every sample scored the same
            logits = self.model(torch.tensor([r.prompt + r.token_ids])).logits[0, len(r.prompt) - 1 : -1]
            lp = sequence_logprobs(logits, r.prompt, r.token_ids, self.params)["processed"]  # [N]
            # A token sampled by older weights (in flight: one step off-policy) can fall outside
            # the current top-p support: its logprob is -inf and its gradient NaN, which would
            # poison every weight. It carries no gradient (its ratio is 0, as clipped).
            inside = torch.isfinite(lp.detach())
            lp = torch.where(inside, lp, torch.zeros_like(lp))
            ratio = torch.exp(lp - lp.detach())  # 1 in value; its gradient is that of lp
            loss = -(ratio * a * inside).sum() / num_tokens
            loss.backward()
            total += float(loss.detach())
        self.opt.step()
        return total

    def snapshot(self, version: int, new_version: int) -> None:
        """Before sending new weights as `new_version`: keep a copy of the current ones as
        `version`, drop anything older."""
        self.versions = {version: copy.deepcopy(self.model).eval(), new_version: self.model}

    def advance(self, new_version: int) -> None:
        """The weights now serve as `new_version` (synchronous loop: no old copy needed)."""
        self.versions = {new_version: self.model}


def advantages(rollouts: Sequence[Rollout]) -> list[float]:
    groups: dict[int, list[float]] = {}
    for r in rollouts:
        groups.setdefault(r.group, []).append(r.reward)
    stats = {g: (sum(v) / len(v), torch.tensor(v).std(unbiased=False).item()) for g, v in groups.items()}
    return [(r.reward - stats[r.group][0]) / (stats[r.group][1] + 1e-4) for r in rollouts]
