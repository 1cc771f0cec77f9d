"""The GRPO-style RL loop: rollouts from our server (async SDK), an fp32 HF trainer, and
weights synced through vLLM's weight-transfer protocol (gloo) after every step.

Synchronous: rollouts, then score + train, then send the new weights (recompute-free).
In flight (PipelineRL style, mode keep): this step's rollouts start, and once every one
has tokens, the engine pauses (keep), the trainer steps on the previous batch and sends
the weights, and the rollouts go on with the new ones on their old KV: one step off-policy,
each sequence split across two weight versions.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from api.client import AsyncClient
from asyncengine.rl.metrics import StepMetrics, step_metrics
from asyncengine.rl.sender import WeightSender
from asyncengine.rl.server import ServerProcess
from asyncengine.rl.task import SYSTEM, problems
from asyncengine.rl.trainer import Rollout, Trainer
from asyncengine.sampling_params import SamplingParams

ADMIN_KEY = "rl-loop"


@dataclass(frozen=True, slots=True)
class RunConfig:
    name: str
    steps: int = 20
    lr: float = 0.0
    num_prompts: int = 4
    group_size: int = 4  # G samples per prompt
    max_tokens: int = 24
    temperature: float = 0.8
    top_p: float = 0.95
    inflight: bool = False  # keep-mode updates while the step's rollouts run
    seed: int = 0
    max_operand: int = 20  # the task's additions: operands 0..max_operand


@dataclass(slots=True)
class RunResult:
    config: RunConfig
    # Metric series per scoring: "right" (processed logprobs, per-token versions), "raw"
    # (the engine's raw logprobs against the same trainer), "one_version" (the trainer
    # assumes one version per sequence).
    steps: dict[str, list[StepMetrics]]
    transfer_s: list[float]
    wall_s: float


class Loop:
    def __init__(self, cfg: RunConfig, model_dir: Path, client: AsyncClient, sender: WeightSender) -> None:
        self.cfg, self.client, self.sender = cfg, client, sender
        self.params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
        self.trainer = Trainer(model_dir, cfg.lr, self.params)
        self.version = 0
        self.transfer_s: list[float] = []

    def batch(self, step: int) -> list[tuple[Rollout, object]]:
        probs = problems(step, self.cfg.num_prompts, self.cfg.seed, self.cfg.max_operand)
        return [(Rollout(self.trainer.chat_prompt(SYSTEM, p.question), i), p)
                for i, p in enumerate(probs) for _ in range(self.cfg.group_size)]

    async def generate(self, r: Rollout, seed: int) -> None:
        body = dict(max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                    seed=seed, return_weight_versions=True, return_raw_logprobs=True)
        async for d in self.client.stream_complete(r.prompt, **body):
            r.token_ids += d.token_ids
            r.logprobs += d.logprobs
            r.raw_logprobs += d.raw_logprobs or []
            r.weight_versions += d.weight_versions
            r.text += d.text

    async def sync(self, mode: str) -> None:
        """Send the trainer's weights (the next version) through the protocol."""
        t0 = time.perf_counter()
        self.version = await asyncio.to_thread(self.sender.send, self.trainer.model, mode)
        self.transfer_s.append(time.perf_counter() - t0)

    async def rollouts(self, step: int, previous: list[Rollout] | None) -> list[Rollout]:
        pairs = self.batch(step)
        seeds = [self.cfg.seed * 100_003 + step * 1000 + i for i in range(len(pairs))]
        tasks = [asyncio.create_task(self.generate(r, s)) for (r, _), s in zip(pairs, seeds)]
        if self.cfg.inflight and previous is not None:
            while not all(r.token_ids for r, _ in pairs) and not all(t.done() for t in tasks):
                await asyncio.sleep(0.005)
            await asyncio.to_thread(self.sender.request, "POST", "/pause?mode=keep", {})
            self.trainer.snapshot(self.version, self.version + 1)  # the weights the rollouts began with
            await asyncio.to_thread(self.trainer.train_step, previous)
            await self.sync("keep")
            await asyncio.to_thread(self.sender.request, "POST", "/resume", {})
        await asyncio.gather(*tasks)
        for r, p in pairs:
            r.reward = p.reward(r.text)  # type: ignore[attr-defined]
        return [r for r, _ in pairs]

    def score(self, step: int, batch: list[Rollout]) -> dict[str, StepMetrics]:
        rewards = [r.reward for r in batch]
        versions = [v for r in batch for v in r.weight_versions]
        right = torch.cat([self.trainer.score(r, True) for r in batch])
        out = {"right": step_metrics(step, torch.tensor([x for r in batch for x in r.logprobs]), right,
                                     rewards, versions),
               "raw": step_metrics(step, torch.tensor([x for r in batch for x in r.raw_logprobs]), right,
                                   rewards, versions)}
        if self.cfg.inflight:
            one = torch.cat([self.trainer.score(r, False) for r in batch])
            engine = torch.tensor([x for r in batch for x in r.logprobs])
            out["one_version"] = step_metrics(step, engine, one, rewards, versions)
            # Split at each sequence's switch: the one-version trainer is wrong exactly after it.
            after = torch.tensor([v != r.weight_versions[0] for r in batch for v in r.weight_versions])
            for key, mask in (("one_version_before_switch", ~after), ("one_version_after_switch", after)):
                if bool(mask.any()):
                    out[key] = step_metrics(step, engine[mask], one[mask], rewards,
                                            [v for v, m in zip(versions, mask.tolist()) if m])
        return out

    async def run(self, log: bool = True) -> dict[str, list[StepMetrics]]:
        series: dict[str, list[StepMetrics]] = {}
        previous: list[Rollout] | None = None
        for step in range(self.cfg.steps):
            batch = await self.rollouts(step, previous)
            for key, m in (await asyncio.to_thread(self.score, step, batch)).items():
                series.setdefault(key, []).append(m)
            if log:
                print(f"[{self.cfg.name}] {series['right'][-1].line()}", flush=True)
            if not self.cfg.inflight:
                await asyncio.to_thread(self.trainer.train_step, batch)
                await self.sync("keep")
                self.trainer.advance(self.version)
            previous = batch
        return series


async def run_on_server(cfg: RunConfig, model_dir: Path, url: str, log: bool = True) -> RunResult:
    """Run the loop against a running server: join its group, send the trainer's initial
    weights (so whatever it served before is replaced and its prefix cache dropped), loop."""
    t0 = time.perf_counter()
    sender = WeightSender(url, ADMIN_KEY)
    await asyncio.to_thread(sender.init)
    try:
        async with AsyncClient(url) as client:
            loop = Loop(cfg, model_dir, client, sender)
            loop.version = await asyncio.to_thread(sender.send, loop.trainer.model, "abort")
            loop.trainer.advance(loop.version)
            series = await loop.run(log)
    finally:
        sender.close()
    return RunResult(cfg, series, loop.transfer_s, time.perf_counter() - t0)


def server(model_dir: Path, flags: tuple[str, ...], log: Path) -> ServerProcess:
    return ServerProcess(["--model", str(model_dir), "--admin-key", ADMIN_KEY, *flags], log)
