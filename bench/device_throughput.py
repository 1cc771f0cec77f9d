"""Ours vs HF transformers `generate` on one device, with random weights built from a
config (no download, no model hub): the speed half of scripts/gpu_check.sh.

Workloads (greedy, ignore_eos), as bench/throughput.py, scaled by --scale:
  prefill-heavy: 64 prompts of 32-512 tokens, 128 new tokens each
  decode-heavy:  64 prompts of ~16 tokens, 512 new tokens each
For each workload and dtype it prints our tokens/s, HF's on the same prompts and device
(padded batches of 16, as users run it) and the ratio. Both sides are warmed up first
(ours: the whole workload with 4 new tokens, so Triton compiles its kernels outside the
measurement); the prefix cache is reset before the measured run.

    python bench/device_throughput.py --device cuda                      # SmolLM2-135M config
    TRITON_INTERPRET=1 python bench/device_throughput.py --device cpu --config tiny --kernel-backend triton \
        --scale 0.03 --max-prompt-len 24 --new-tokens 3                 # the interpreter, seconds
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from asyncengine.llm import LLM  # noqa: E402
from asyncengine.sampling_params import SamplingParams  # noqa: E402
from bench.throughput import workloads  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# SmolLM2-135M-Instruct's architecture (its config.json), and a tiny one for CPU runs.
CONFIGS: dict[str, dict[str, object]] = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2),
    "tiny": dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
}


def random_model_dir(name: str, root: Path, seed: int = 0) -> Path:
    """A Llama checkpoint with random weights (std 0.02, norms 1) saved under root/name."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**CONFIGS[name]))  # type: ignore[arg-type]
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.fill_(1.0) if "norm" in pname else p.normal_(0.0, 0.02)
    path = root / name
    model.save_pretrained(str(path))
    return path


def run_ours(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, sp.with_options(max_tokens=min(4, new_tokens)), use_tqdm=False)  # warm-up: kernels compile
    llm.engine.reset_prefix_cache()  # every measured prompt is computed, as HF computes it
    t = time.perf_counter()
    results = llm.generate(prompts, sp, use_tqdm=False)  # returns after the last step's sync
    dt = time.perf_counter() - t
    assert all(len(r.token_ids) == new_tokens for r in results)
    return len(prompts) * new_tokens / dt


def run_hf(model_dir: Path, dtype: torch.dtype, device: str, prompts: list[list[int]], new_tokens: int,
           batch: int = 16) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    pad = 0

    def generate(chunk: list[list[int]], new: int) -> None:
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=pad)
        assert out.shape[1] == width + new

    generate(prompts[:batch], min(4, new_tokens))  # warm-up
    _sync(device)
    t = time.perf_counter()
    for i in range(0, len(prompts), batch):
        generate(prompts[i : i + batch], new_tokens)
    _sync(device)
    return len(prompts) * new_tokens / (time.perf_counter() - t)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--config", default="smollm2", choices=sorted(CONFIGS))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--workloads", default="prefill,decode")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink prompt count and new tokens")
    ap.add_argument("--max-prompt-len", type=int, default=None, help="cut prompts to this many tokens")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per prompt (default: the workload's)")
    ap.add_argument("--kernel-backend", default="auto", help="auto = Triton on CUDA; triton = the interpreter on CPU")
    a = ap.parse_args()
    where = torch.cuda.get_device_name() if a.device.startswith("cuda") else "CPU"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_model_dir(a.config, Path(tmp))
        print(f"config {a.config} (random weights)  device {a.device} ({where})  backend {a.kernel_backend}")
        for dtype_name in a.dtypes.split(","):
            llm = LLM(model=str(model_dir), dtype=dtype_name, device=a.device, kernel_backend=a.kernel_backend,
                      kv_cache_memory_gb=4.0 if a.device.startswith("cuda") else 0.25)
            print(f"[{dtype_name}] ops {llm.engine.model.ops.name}", flush=True)
            for name, (prompts, new) in workloads(a.scale, CONFIGS[a.config]["vocab_size"]).items():  # type: ignore[arg-type]
                if name not in a.workloads.split(","):
                    continue
                prompts = [p[: a.max_prompt_len] for p in prompts] if a.max_prompt_len else prompts
                new = a.new_tokens or new
                ours = run_ours(llm, prompts, new)
                hf = run_hf(model_dir, DTYPES[dtype_name], a.device, prompts, new)
                print(f"  {name:8s} {len(prompts)} prompts x {new} new: ours {ours:8.1f} tok/s | "
                      f"HF generate {hf:8.1f} tok/s | ratio {ours / hf:5.2f}x", flush=True)
            del llm


if __name__ == "__main__":
    main()
