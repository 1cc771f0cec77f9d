"""Builds the batch tensors of a step, runs the model, computes fp32 logits and samples."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from asyncengine import sampler
from asyncengine.config import ConfigError, EngineConfig
from asyncengine.models.args import ModelArgs, rope_inv_freq
from asyncengine.models.llama import LlamaModel
from asyncengine.models.weights import load_weights, read_safetensors
from asyncengine.reliability.faults import FaultHook
from asyncengine.outputs import ModelRunnerOutput, PromptLogprobs, SampleResult, SchedulerOutput
from asyncengine.request import Request
from asyncengine.row_reductions import RowStats, row_stats, rows_finite
from kernels.attention import AttentionMetadata
from kernels.dispatch import get_ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_model(model_dir: Path, config: EngineConfig) -> tuple[LlamaModel, object]:
    """Read config + safetensors of an HF checkpoint directory into our model."""
    from transformers import AutoConfig

    _check_device(config)
    hf_config = AutoConfig.from_pretrained(str(model_dir))
    args = ModelArgs.from_hf_config(hf_config)
    inv_freq, scaling = rope_inv_freq(hf_config, args.head_dim)
    ops = get_ops(config.kernel_backend, config.device)
    if ops.name == "triton" and config.device == "cpu" and "bfloat16" in (config.dtype, config.head_dtype):
        # The interpreter computes bf16 on raw bit patterns: only fp32 is exact there.
        raise ConfigError('kernel_backend="triton" on CPU (the Triton interpreter) runs fp32 only')
    model = LlamaModel(args, inv_freq, scaling, ops, DTYPES[config.dtype], DTYPES[config.head_dtype],
                       config.deterministic, config.device, config.gemm_tile_rows)
    load_weights(model, read_safetensors(model_dir))
    return model, hf_config


def _check_device(config: EngineConfig) -> None:
    device = torch.device(config.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={config.device!r}, but this torch ({torch.__version__}) sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={config.device!r}, but there are {torch.cuda.device_count()} CUDA devices")
        if device.index is not None:  # Triton launches on the current device
            torch.cuda.set_device(device)


@dataclass(slots=True)
class StepInputs:
    """One step's model inputs and who needs which logit row."""

    input_ids: torch.Tensor  # [T] int64, on the device
    meta: AttentionMetadata
    rows: list[int]  # hidden rows that need logits: prompt-logprob positions, then samplers
    row_index: torch.Tensor | None  # [R] int64 `rows` on the device (CUDA only; else built if needed)
    sample_reqs: list[tuple[int, Request]]  # (logit row, request) of each request that samples
    plp_slices: list[tuple[Request, int, tuple[int, int]]]  # (request, first logit row, prompt range)


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
        device = torch.device(self.config.device)
        if device.type == "cuda" and device.index is not None:
            # The current device is per thread, and Triton launches on it: steps may run
            # on another thread than the one that loaded the model.
            with torch.cuda.device(device):
                return self._execute(sched)
        return self._execute(sched)

    def _execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        step = self._prepare(sched)
        hidden = self.model.forward(step.input_ids, step.meta, self.kv_caches)  # [T, H]
        if self.faults is not None:
            self.faults.after_forward([s.request.request_id for s in sched.scheduled])
        if not step.rows:
            return ModelRunnerOutput(samples={}, prompt_logprobs={})
        logits = self.model.compute_logits(_take_rows(hidden, step.rows, step.row_index))  # [R, V] fp32
        if logits.device.type == "cuda":
            logits = _to_host(logits)
        sample_reqs, plp_slices = step.sample_reqs, step.plp_slices
        stats, finite = self._check_rows(logits, sample_reqs, plp_slices)
        failed = self._nonfinite_rows(finite, sample_reqs, plp_slices)
        if failed:  # drop the failed requests' rows; the others sample row by row, unchanged
            sample_reqs = [(i, r) for i, r in sample_reqs if r.request_id not in failed]
            plp_slices = [p for p in plp_slices if p[0].request_id not in failed]
        samples: dict[str, SampleResult] = {}
        if sample_reqs:
            rows = [i for i, _ in sample_reqs]
            if stats is not None and rows != list(range(logits.shape[0])):  # the sampled rows' stats
                index = torch.tensor(rows, dtype=torch.int64)
                stats = RowStats(stats.lse[index], stats.argmax[index], stats.finite[index])
            results = sampler.sample(_take_rows(logits, rows), [r for _, r in sample_reqs], stats)
            samples = {r.request_id: res for (_, r), res in zip(sample_reqs, results)}
        plps: dict[str, PromptLogprobs] = {}
        for req, lo_row, (lo, hi) in plp_slices:
            targets = req.prompt_token_ids[lo + 1 : hi + 1]
            plps[req.request_id] = sampler.prompt_logprobs(
                logits[lo_row : lo_row + hi - lo], targets, req.params.prompt_logprobs or 0
            )
        return ModelRunnerOutput(samples=samples, prompt_logprobs=plps, failed=failed)

    def _check_rows(
        self, logits: torch.Tensor, sample_reqs: list[tuple[int, Request]],
        plp_slices: list[tuple[Request, int, tuple[int, int]]],
    ) -> tuple[RowStats | None, torch.Tensor]:
        """([R] row stats for the sampler, or None; [R] bool finite rows). Where every row
        samples from the logits as they are (a plain decode step), one `row_stats` call
        also gives the sampler its normalizer and greedy tokens: one read of the logits,
        not two."""
        if self.faults is not None:
            self.faults.corrupt_logits(logits, _row_owners(logits.shape[0], sample_reqs, plp_slices))
        if not plp_slices and sampler.reads_logits_as_is([r for _, r in sample_reqs]):
            stats = row_stats(logits)
            return stats, stats.finite
        return None, rows_finite(logits)

    def _nonfinite_rows(
        self, finite: torch.Tensor, sample_reqs: list[tuple[int, Request]],
        plp_slices: list[tuple[Request, int, tuple[int, int]]],
    ) -> dict[str, str]:
        """request_id -> reason, for requests with a NaN or inf among their logits rows
        (finite: [R] bool); one host sync checks the whole step."""
        if bool(finite.all()):
            return {}
        owners = _row_owners(finite.shape[0], sample_reqs, plp_slices)
        bad = (~finite).nonzero()[:, 0].tolist()
        return {owners[i]: "the model produced non-finite logits (NaN or inf)" for i in bad}

    def _prepare(self, sched: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        width = max(len(s.block_ids) for s in sched.scheduled)
        tables: list[int] = []  # [S * width], row-major
        for s in sched.scheduled:
            end = s.start + s.num_new_tokens
            ids.extend(s.request.all_token_ids[s.start : end])
            pos = range(s.start, end)
            positions.extend(pos)
            slots.extend(s.block_ids[p // bs] * bs + p % bs for p in pos)
            qsl.append(qsl[-1] + s.num_new_tokens)
            seq_lens.append(end)
            tables.extend(s.block_ids + [0] * (width - len(s.block_ids)))
        rows, sample_reqs, plp = self._logit_rows(sched, qsl)
        on_cuda = torch.device(self.config.device).type == "cuda"
        parts = [ids, qsl, seq_lens, tables, slots, positions] + ([rows] if on_cuda else [])
        t = _int64_tensors(parts, self.config.device, on_cuda)
        meta = AttentionMetadata(
            query_start_loc=t[1],
            seq_lens=t[2],
            block_tables=t[3].view(len(seq_lens), width),
            slot_mapping=t[4],
            positions=t[5],
            query_start_loc_list=qsl,
            seq_lens_list=seq_lens,
        )
        return StepInputs(t[0], meta, rows, t[6] if on_cuda else None, sample_reqs, plp)

    @staticmethod
    def _logit_rows(
        sched: SchedulerOutput, qsl: list[int]
    ) -> tuple[list[int], list[tuple[int, Request]], list[tuple[Request, int, tuple[int, int]]]]:
        """Hidden rows that need logits: prompt-logprob positions, then the last row of
        each request that samples. Returns (rows, [(logit row, request)], prompt slices)."""
        rows: list[int] = []
        sample_reqs: list[tuple[int, Request]] = []
        plp: list[tuple[Request, int, tuple[int, int]]] = []
        for i, s in enumerate(sched.scheduled):
            first = qsl[i]
            if s.prompt_logprob_range is not None:
                lo, hi = s.prompt_logprob_range
                plp.append((s.request, len(rows), (lo, hi)))
                rows.extend(first + p - s.start for p in range(lo, hi))
            if s.sample:
                sample_reqs.append((len(rows), s.request))
                rows.append(first + s.num_new_tokens - 1)
        return rows, sample_reqs, plp


def _int64_tensors(parts: list[list[int]], device: str, on_cuda: bool) -> list[torch.Tensor]:
    """One int64 tensor per list on the device. On CUDA the lists are written once into
    one pinned host buffer and cross in one non-blocking copy (no wait here; the step's
    only synchronization is its logits coming back); on CPU each list is its own tensor."""
    if not on_cuda:
        return [torch.tensor(p, dtype=torch.int64, device=device) for p in parts]
    flat = [v for p in parts for v in p]
    host = torch.tensor(flat, dtype=torch.int64, pin_memory=True)  # [sum of lengths]
    return list(host.to(device, non_blocking=True).split([len(p) for p in parts]))


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """The step's one synchronization: fp32 logits into pinned host memory. The sampler
    then runs the logprob contract's own functions (asyncengine.logprobs, what a trainer
    calls) on the host copy, the same bits as on the CPU engine for the same logits."""
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)  # [R, V]
    host.copy_(x, non_blocking=True)
    torch.cuda.current_stream(x.device).synchronize()
    return host


def _row_owners(n: int, sample_reqs: list[tuple[int, Request]],
                plp_slices: list[tuple[Request, int, tuple[int, int]]]) -> list[str]:
    """The request id of each of a step's n logits rows."""
    owners = [""] * n
    for req, lo_row, (lo, hi) in plp_slices:
        owners[lo_row : lo_row + hi - lo] = [req.request_id] * (hi - lo)
    for i, req in sample_reqs:
        owners[i] = req.request_id
    return owners


def _take_rows(x: torch.Tensor, rows: list[int], index: torch.Tensor | None = None) -> torch.Tensor:
    """x[rows] ([len(rows), ...]); x itself when rows are all of x in order (every decode
    step), sparing a copy of [R, V] logits. index: rows already as a tensor on x's device."""
    if len(rows) == x.shape[0] and rows == list(range(len(rows))):
        return x
    if index is None:
        index = torch.tensor(rows, dtype=torch.int64, device=x.device)
    return x.index_select(0, index)
