"""Builds the batch tensors of a step, runs the model, computes fp32 logits and samples."""
from __future__ import annotations

from pathlib import Path

import torch

from asyncengine import sampler
from asyncengine.config import EngineConfig
from asyncengine.models.args import ModelArgs, rope_inv_freq
from asyncengine.models.llama import LlamaModel
from asyncengine.models.weights import load_weights, read_safetensors
from asyncengine.reliability.faults import FaultHook
from asyncengine.outputs import ModelRunnerOutput, PromptLogprobs, SampleResult, SchedulerOutput
from asyncengine.request import Request
from kernels.attention import AttentionMetadata
from kernels.dispatch import get_ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_model(model_dir: Path, config: EngineConfig) -> tuple[LlamaModel, object]:
    """Read config + safetensors of an HF checkpoint directory into our model."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(model_dir))
    args = ModelArgs.from_hf_config(hf_config)
    inv_freq, scaling = rope_inv_freq(hf_config, args.head_dim)
    model = LlamaModel(
        args,
        inv_freq,
        scaling,
        get_ops(config.kernel_backend, config.device),
        DTYPES[config.dtype],
        DTYPES[config.head_dtype],
        config.deterministic,
        config.device,
        config.gemm_tile_rows,
    )
    load_weights(model, read_safetensors(model_dir))
    return model, hf_config


class ModelRunner:
    def __init__(
        self, model: LlamaModel, config: EngineConfig, num_blocks: int, faults: FaultHook | None = None
    ) -> None:
        self.model = model
        # Test hook (asyncengine/reliability/faults.py); None in production.
        self.faults = faults
        self.config = config
        self.block_size = config.block_size
        a = model.args
        # Zero-filled (padded block-table entries may be read, then masked: never NaN); every
        # op sees [NB, BS, Hkv, D], stored in the layout the kernel backend reads fastest.
        self.kv_caches = [
            model.ops.new_kv_cache(num_blocks, config.block_size, a.num_kv_heads, a.head_dim,
                                   dtype=model.dtype, device=config.device)
            for _ in range(a.num_layers)
        ]

    @staticmethod
    def kv_bytes_per_block(args: ModelArgs, block_size: int, dtype: str) -> int:
        return 2 * args.num_layers * block_size * args.num_kv_heads * args.head_dim * DTYPES[dtype].itemsize

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        if not sched.scheduled:
            return ModelRunnerOutput(samples={}, prompt_logprobs={})
        input_ids, meta = self._prepare(sched)
        hidden = self.model.forward(input_ids, meta, self.kv_caches)  # [T, H]
        if self.faults is not None:
            self.faults.after_forward([s.request.request_id for s in sched.scheduled])
        rows, sample_reqs, plp_slices = self._logit_rows(sched, meta)
        if not rows:
            return ModelRunnerOutput(samples={}, prompt_logprobs={})
        logits = self.model.compute_logits(_take_rows(hidden, rows))  # [R, V] fp32
        failed = self._nonfinite_rows(logits, sample_reqs, plp_slices)
        if failed:  # drop the failed requests' rows; the others sample row by row, unchanged
            sample_reqs = [(i, r) for i, r in sample_reqs if r.request_id not in failed]
            plp_slices = [p for p in plp_slices if p[0].request_id not in failed]
        samples: dict[str, SampleResult] = {}
        if sample_reqs:
            results = sampler.sample(_take_rows(logits, [i for i, _ in sample_reqs]), [r for _, r in sample_reqs])
            samples = {r.request_id: res for (_, r), res in zip(sample_reqs, results)}
        plps: dict[str, PromptLogprobs] = {}
        for req, lo_row, (lo, hi) in plp_slices:
            targets = req.prompt_token_ids[lo + 1 : hi + 1]
            plps[req.request_id] = sampler.prompt_logprobs(
                logits[lo_row : lo_row + hi - lo], targets, req.params.prompt_logprobs or 0
            )
        return ModelRunnerOutput(samples=samples, prompt_logprobs=plps, failed=failed)

    def _nonfinite_rows(
        self, logits: torch.Tensor, sample_reqs: list[tuple[int, Request]],
        plp_slices: list[tuple[Request, int, tuple[int, int]]],
    ) -> dict[str, str]:
        """request_id -> reason, for requests with a NaN or inf among their logits rows.

        A row sum is finite iff every entry is (fp32 logits are far from overflow), so
        one [R] reduction and one host sync check the whole step.
        """
        owners = [""] * logits.shape[0]
        for req, lo_row, (lo, hi) in plp_slices:
            owners[lo_row : lo_row + hi - lo] = [req.request_id] * (hi - lo)
        for i, req in sample_reqs:
            owners[i] = req.request_id
        if self.faults is not None:
            self.faults.corrupt_logits(logits, owners)
        finite = torch.isfinite(logits.sum(dim=-1))  # [R]
        if bool(finite.all()):
            return {}
        bad = (~finite).nonzero()[:, 0].tolist()
        return {owners[i]: "the model produced non-finite logits (NaN or inf)" for i in bad}

    def _prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        width = max(len(s.block_ids) for s in sched.scheduled)
        tables: list[list[int]] = []
        for s in sched.scheduled:
            end = s.start + s.num_new_tokens
            ids.extend(s.request.all_token_ids[s.start : end])
            pos = range(s.start, end)
            positions.extend(pos)
            slots.extend(s.block_ids[p // bs] * bs + p % bs for p in pos)
            qsl.append(qsl[-1] + s.num_new_tokens)
            seq_lens.append(end)
            tables.append(s.block_ids + [0] * (width - len(s.block_ids)))
        dev = self.config.device
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int64, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            query_start_loc_list=qsl,
            seq_lens_list=seq_lens,
        )
        return torch.tensor(ids, dtype=torch.int64, device=dev), meta

    @staticmethod
    def _logit_rows(
        sched: SchedulerOutput, meta: AttentionMetadata
    ) -> tuple[list[int], list[tuple[int, Request]], list[tuple[Request, int, tuple[int, int]]]]:
        """Hidden rows that need logits: prompt-logprob positions, then the last row of
        each request that samples. Returns (rows, [(logit row, request)], prompt slices)."""
        rows: list[int] = []
        sample_reqs: list[tuple[int, Request]] = []
        plp: list[tuple[Request, int, tuple[int, int]]] = []
        for i, s in enumerate(sched.scheduled):
            first = meta.query_start_loc_list[i]
            if s.prompt_logprob_range is not None:
                lo, hi = s.prompt_logprob_range
                plp.append((s.request, len(rows), (lo, hi)))
                rows.extend(first + p - s.start for p in range(lo, hi))
            if s.sample:
                sample_reqs.append((len(rows), s.request))
                rows.append(first + s.num_new_tokens - 1)
        return rows, sample_reqs, plp


def _take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] ([len(rows), ...]); x itself when rows are all of x in order (every decode
    step), sparing a copy of [R, V] logits."""
    if len(rows) == x.shape[0] and rows == list(range(len(rows))):
        return x
    return x.index_select(0, torch.tensor(rows, dtype=torch.int64, device=x.device))
