"""`asyncengine parity`: do the rollout logprobs equal what the trainer recomputes?

Runs a rollout workload on the engine, recomputes the same tokens with HF transformers
in float32 as a trainer would, and turns HF's logits into the trainer's logprobs with an
independent reference: by default `reference_logprobs` below, the contract's formula
written out in float64 (it shares no code with `asyncengine.logprobs`, the functions
the sampler calls, so a bug there shows up here); `--reference contract` uses the
exported `asyncengine.logprobs.sequence_logprobs` instead (the trainer path DESIGN.md
offers). The report says which one it used, and reports |Δ logprob|, a KL(rollout || trainer) estimate and the
share of importance ratios exp(trainer - rollout) outside [0.8, 1.2] and
[0.999, 1.001], with a PNG histogram. Each misconfiguration of the usual migration
story shows up here: raw logprobs at T != 1 (--logprobs-mode raw), a bf16 head against
an fp32 trainer (--dtype bfloat16 --lm-head-dtype bfloat16), and a prefix cache that
survives a weight update (--update-weights stale).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from asyncengine.config import EngineConfig
from asyncengine.sampling_params import SamplingParams

TOPICS = ["the sea", "GPUs", "a cat", "Paris", "prime numbers", "rain", "chess", "coffee",
          "the moon", "trains", "music", "bread", "rivers", "robots", "winter", "books"]
SYSTEM = "You are a careful assistant. Answer in two or three sentences, plainly and accurately."
REFERENCES = {
    "float64": "float64 formula (parity.reference_logprobs, independent of asyncengine.logprobs)",
    "contract": "asyncengine.logprobs.sequence_logprobs (the functions the sampler calls)",
}


def add_parity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--logprobs-mode", choices=["processed", "raw"], default="processed",
                   help="what the rollout engine returns")
    p.add_argument("--trainer-mode", choices=["processed", "raw"], default="processed",
                   help="what the trainer recomputes (processed = the sampling distribution)")
    p.add_argument("--update-weights", choices=["none", "proper", "stale"], default="none",
                   help="warm the prefix cache, then change the weights: through update_weights "
                        "(proper) or by writing tensors behind the engine's back (stale)")
    p.add_argument("--reference", choices=sorted(REFERENCES), default="float64",
                   help="how the trainer side turns HF fp32 logits into logprobs")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest |Δ logprob| that still counts as a match")
    p.add_argument("--plot", default="parity.png", help="histogram PNG path ('' for none)")


@dataclass(slots=True)
class ParityReport:
    num_tokens: int
    mean_abs: float
    max_abs: float
    kl_k1: float
    kl_k3: float
    outside_20pct: float
    outside_01pct: float
    tolerance: float = 1e-4

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance and self.outside_01pct == 0.0

    def lines(self) -> list[str]:
        return [
            f"tokens compared                 {self.num_tokens}",
            f"mean |Δ logprob|                {self.mean_abs:.3e}",
            f"max  |Δ logprob|                {self.max_abs:.3e}",
            f"KL(rollout||trainer) k1 / k3    {self.kl_k1:.3e} / {self.kl_k3:.3e}",
            f"ratios outside [0.8, 1.2]       {100 * self.outside_20pct:.2f}%",
            f"ratios outside [0.999, 1.001]   {100 * self.outside_01pct:.2f}%",
            f"verdict (max |Δ| <= {self.tolerance:.0e})    "
            + ("MATCH" if self.ok else "MISMATCH: rollout and trainer disagree"),
        ]


def report(rollout: torch.Tensor, trainer: torch.Tensor, tolerance: float = 1e-4) -> ParityReport:
    """rollout, trainer: [N] per-token logprobs of the same sampled tokens."""
    delta = (rollout - trainer).double()  # log p_rollout - log p_trainer
    ratio = torch.exp(-delta)  # importance ratio trainer / rollout
    return ParityReport(
        num_tokens=delta.numel(),
        mean_abs=delta.abs().mean().item(),
        max_abs=delta.abs().max().item(),
        kl_k1=delta.mean().item(),
        kl_k3=(ratio - 1 + delta).mean().item(),
        outside_20pct=((ratio < 0.8) | (ratio > 1.2)).double().mean().item(),
        outside_01pct=((ratio < 0.999) | (ratio > 1.001)).double().mean().item(),
        tolerance=tolerance,
    )


def perturbed_state(model_dir: Path, scale: float = 0.02, seed: int = 0) -> dict[str, torch.Tensor]:
    """The checkpoint's weights after a pretend training step (relative Gaussian noise)."""
    from asyncengine.models.weights import read_safetensors

    gen = torch.Generator().manual_seed(seed)
    state = read_safetensors(model_dir)
    return {k: v.float() * (1 + scale * torch.randn(v.shape, generator=gen)) for k, v in state.items()}


def run_parity(a: argparse.Namespace, config: EngineConfig) -> int:
    from asyncengine.llm import LLM

    llm = LLM(config=config)
    prompts = [llm.chat_prompt([{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}])
               for i in range(a.num_prompts)]
    params = [SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                             seed=i, ignore_eos=True, logprobs_mode=a.logprobs_mode) for i in range(a.num_prompts)]
    new_state = None
    if a.update_weights != "none":
        llm.generate(prompts, [p.with_options(max_tokens=1) for p in params], use_tqdm=False)  # warm the cache
        new_state = perturbed_state(llm.engine.model_dir)
        if a.update_weights == "proper":
            llm.engine.update_weights(new_state)
        else:  # the bug: weights replaced, prefix cache and version untouched
            from asyncengine.models.weights import load_weights

            load_weights(llm.engine.model, new_state)
    results = llm.generate(prompts, params, use_tqdm=False)
    trainer = trainer_logprobs(llm.engine.model_dir, new_state, prompts, results, params, a.trainer_mode,
                               a.reference)
    rollout = torch.tensor([lp for r in results for lp in r.logprobs])
    rep = report(rollout, trainer, a.tolerance)
    print(f"parity: model {llm.engine.model_dir.name}, dtype {config.dtype}, head {config.head_dtype}, "
          f"rollout mode {a.logprobs_mode}, trainer mode {a.trainer_mode}, T={a.temperature}, "
          f"top_p={a.top_p}, top_k={a.top_k}, prefix caching {config.enable_prefix_caching}, "
          f"chunked prefill {config.enable_chunked_prefill}, weight update {a.update_weights}")
    print(f"trainer reference: HF fp32 logits, then {REFERENCES[a.reference]}")
    print("\n".join(rep.lines()))
    if a.plot:
        plot_histogram(rollout - trainer, Path(a.plot))
        print(f"histogram: {a.plot}")
    return 0 if rep.ok else 1


def trainer_logprobs(model_dir: Path, state: dict[str, torch.Tensor] | None, prompts: list[list[int]],
                     results: list, params: list[SamplingParams], mode: str,
                     reference: str = "float64") -> torch.Tensor:
    """HF fp32 forward on prompt + response, then the chosen reference (REFERENCES)."""
    from transformers import AutoModelForCausalLM

    from asyncengine.logprobs import sequence_logprobs

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if state is not None:
        loaded = hf.load_state_dict(state, strict=False)
        assert not loaded.unexpected_keys and set(loaded.missing_keys) <= {"lm_head.weight"}, loaded
    out = []
    for prompt, res, sp in zip(prompts, results, params):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + res.token_ids])).logits[0, len(prompt) - 1 : -1].float()
        recompute = reference_logprobs if reference == "float64" else sequence_logprobs
        out.append(recompute(logits, prompt, res.token_ids, sp)[mode].float())
    return torch.cat(out)


def reference_logprobs(logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int],
                       params: SamplingParams) -> dict[str, torch.Tensor]:
    """DESIGN.md's logprob contract written out in float64, position by position, sharing
    no code with asyncengine.logprobs. logits: [N, V] (row i predicts output_ids[i]).
    Returns float64 [N] "processed", "raw", "log_kept_mass" and "full" (log_softmax(z')[t],
    what a trainer that applies only penalties and temperature computes), and "support"
    [N, V] bool.

    Where HF's warpers differ from the contract, this follows the contract: top-k keeps
    exactly k (ties at the k-th value go to the lower token ids; HF keeps every tie),
    top-p keeps a token iff the mass ranked before it is < top_p (HF's ascending fp32
    cumsum is the same rule up to rounding), min-p keeps z'_i - max z' >= log(min_p)."""
    rows: dict[str, list[torch.Tensor]] = {"processed": [], "raw": [], "log_kept_mass": [], "full": [],
                                           "support": []}
    for i, target in enumerate(output_ids):
        z = logits[i].double()  # [V]
        scaled = _penalized(z, set(prompt_ids) | set(output_ids[:i]), output_ids[:i], params)
        if not params.greedy:
            scaled = scaled / params.temperature
        keep = reference_support(scaled, params.top_k, params.top_p, params.min_p)  # [V] bool
        lse_kept = torch.logsumexp(scaled[keep], 0)
        rows["processed"].append(scaled[target] - lse_kept if keep[target] else scaled.new_tensor(-math.inf))
        rows["raw"].append(torch.log_softmax(z, 0)[target])
        lse = torch.logsumexp(scaled, 0)
        rows["log_kept_mass"].append(lse_kept - lse)
        rows["full"].append(scaled[target] - lse)
        rows["support"].append(keep)
    return {k: torch.stack(v) if v else torch.empty(0, dtype=torch.float64) for k, v in rows.items()}


def _penalized(z: torch.Tensor, seen: set[int], output_ids: list[int], sp: SamplingParams) -> torch.Tensor:
    """z [V] float64 -> repetition (HF: z/rp if z > 0 else z*rp, over prompt and output),
    then frequency and presence (OpenAI: over output tokens)."""
    z = z.clone()
    if sp.repetition_penalty != 1.0:
        for t in seen:
            z[t] = z[t] / sp.repetition_penalty if z[t] > 0 else z[t] * sp.repetition_penalty
    for t in set(output_ids):
        z[t] -= sp.frequency_penalty * output_ids.count(t) + sp.presence_penalty
    return z


def reference_support(scaled: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """[V] float64 z' -> [V] bool: top-k, then top-p on the top-k renormalized, then
    min-p, by a full sort (value descending, token id ascending) in float64."""
    vocab = scaled.numel()
    order = torch.sort(scaled, descending=True, stable=True).indices  # stable: lower id first among ties
    ranked = scaled[order]  # [V]
    n = top_k if 0 < top_k < vocab else vocab
    probs = torch.softmax(ranked[:n], 0)  # [n] over the top-k support
    mass_before = torch.cat([probs.new_zeros(1), torch.cumsum(probs, 0)[:-1]])  # [n], in rank order
    n_keep = int((mass_before < top_p).sum()) if top_p < 1.0 else n
    keep = torch.zeros(vocab, dtype=torch.bool)
    keep[order[:n_keep]] = True
    if min_p > 0.0:
        keep &= scaled - ranked[0] >= math.log(min_p)
    return keep


def plot_histogram(delta: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = delta.double().abs().clamp_min(1e-12).log10().numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(d, bins=60)
    ax.axvline(math.log10(1e-4), color="r", linestyle="--", label="1e-4")
    ax.set_xlabel("log10 |logprob rollout - trainer|")
    ax.set_ylabel("tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
