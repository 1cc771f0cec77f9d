"""The CPU engine's compiled ops: paged attention (kernels/csrc/paged_attention_cpu.cpp),
the fused per-layer ops RMSNorm, SiLU-and-multiply, RoPE + KV store
(kernels/csrc/fused_ops_cpu.cpp) and a batch-invariant fp32 linear layer
(kernels/csrc/gemm_cpu.cpp).

Attention reads keys and values straight from the block table and computes every query
row by one fixed sequence of operations, so it is batch-invariant by construction and
needs no gather, no row padding and no past-the-end guard (see the comment atop the
source); the fused ops likewise compute each row or element on its own.

The ops are compiled on first use with the machine's C++ compiler against the installed
torch (about 10 s, once), into a cache directory keyed by the source, the torch version
and the CPU's instruction-set flags, then loaded with torch.ops.load_library.
`available()` says whether that worked; kernels.dispatch falls back to the torch path
when it did not.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from kernels import huge_pages
from kernels.attention import AttentionMetadata
from kernels.layer_groups import MIN_ROWS_PER_WEIGHT_BYTE, layer_groups

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "paged_attention_cpu.cpp", CSRC / "fused_ops_cpu.cpp", CSRC / "gemm_cpu.cpp", CSRC / "gemm_amx_cpu.cpp",
           CSRC / "gemm_bf16_avx512_cpu.cpp", CSRC / "sol_probe_cpu.cpp", CSRC / "decoder_layers_cpu.cpp",
           CSRC / "row_reduce_cpu.cpp", CSRC / "overlap_probe_cpu.cpp"]
# -ffp-contract=off: only the source's explicit FMAs fuse, so the rounding of every op
# is fixed by the source, not by what the optimizer happens to contract.
# -fopenmp: at::parallel_for is inlined from the headers; the libgomp.so.1 it needs is
# the one torch already loaded (same soname), so both share one thread pool.
CXXFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w"]

_lock = threading.Lock()
_state: dict[str, object] = {}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "asyncengine" / "ops"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build_key() -> str:
    h = hashlib.sha256(b"".join(p.read_bytes() for p in [*SOURCES, *sorted(CSRC.glob("*.h"))]))
    for part in (torch.__version__, " ".join(CXXFLAGS), _cpu_flags()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _compile(target: Path) -> None:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++ or g++) on PATH")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    root = Path(torch.__file__).parent  # the installed torch's headers and libraries
    includes = [f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}"]
    libs = [f"-L{root / 'lib'}", "-lc10", "-ltorch_cpu"]
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: concurrent builders never see a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [cxx, *CXXFLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, *map(str, SOURCES), "-o", tmp, *libs]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"compiling the CPU ops failed:\n{exc.stderr[-4000:]}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> None:
    """Compile (once per machine and source) and load the op; raises RuntimeError on failure."""
    with _lock:
        if "error" in _state:
            raise RuntimeError(str(_state["error"]))
        if _state.get("loaded"):
            return
        try:
            target = cache_dir() / f"asyncengine_cpu-{_build_key()}.so"
            if not target.exists():
                log.info("compiling the CPU ops into %s", target)
                _compile(target)
            torch.ops.load_library(str(target))
        except (OSError, RuntimeError) as exc:
            _state["error"] = f"the compiled CPU ops are unavailable: {exc}"
            raise RuntimeError(str(_state["error"])) from exc
        _state["loaded"] = True


def available() -> bool:
    try:
        load()
    except RuntimeError as exc:
        log.warning("%s; using the torch ops", exc)
        return False
    return True


def new_kv_cache(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed caches, both seen as [NB, BS, Hkv, D], held in one buffer [NB, Hkv, 2, BS * D]:
    block by block and head by head, the head's keys d-major ([D, BS]: the 16 keys of a
    chunk are [D, 16] rows the score loop reads in place), then its values ([BS, D]: each
    key's values one contiguous row). What one decode item reads of a block is then one
    run of 2 x BS x D elements, next to the same block's other heads, which the items of
    the same sequence read at about the same time: scattered blocks come from memory in
    runs it serves near its streaming rate. Measured on an AMD EPYC Zen 4, 2 threads, 64
    sequences x 256 keys over a 1 GB pool, per layer, against keys and values in separate
    [Hkv, NB, ...] buffers: fp32 1.17 -> 0.96 ms, bf16 0.80 -> 0.57 ms. On huge pages: on
    4 KB pages each scattered block read is a TLB miss (64 x 250 scattered keys, per layer,
    1.74 -> 1.41 ms)."""
    kv = huge_pages.zeros((num_blocks, num_kv_heads, 2, block_size * head_dim), dtype, device)
    k = kv[:, :, 0].view(num_blocks, num_kv_heads, head_dim, block_size).permute(0, 3, 1, 2)
    v = kv[:, :, 1].view(num_blocks, num_kv_heads, block_size, head_dim).permute(0, 2, 1, 3)
    return k, v


def store_kv_cpu(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """store_kv for the caches of new_kv_cache: key, value [T, Hkv, D] into slot_mapping [T]."""
    block_size = k_cache.shape[1]
    # Neither view's (block, slot) dims merge (flatten would copy): index them as a pair, in place.
    block, slot = slot_mapping // block_size, slot_mapping % block_size
    k_cache[block, slot] = key.to(k_cache.dtype)
    v_cache[block, slot] = value.to(v_cache.dtype)


def paged_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Same contract as kernels.attention.paged_attention_torch: q [T, Hq, D],
    caches [NB, BS, Hkv, D] (fp32 or bf16; any layout, values with unit head_dim stride;
    fastest as new_kv_cache lays them out) -> [T, Hq, D]."""
    load()
    out = torch.ops.asyncengine_cpu.paged_attention(
        q.float().contiguous(), k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale
    )  # [T, Hq, D] fp32
    return out.to(q.dtype)


def rms_norm_cpu(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as kernels.rmsnorm.rms_norm_torch (x, residual [T, H]; weight [H])."""
    load()
    y, new_residual = torch.ops.asyncengine_cpu.rms_norm(
        x.contiguous(), weight.contiguous(), eps, None if residual is None else residual.contiguous()
    )
    return y, new_residual


def silu_mul_cpu(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] (gate | up) -> silu(gate) * up [T, I], exact silu per element."""
    load()
    return torch.ops.asyncengine_cpu.silu_mul(gate_up.contiguous())


def rope_store_kv_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """apply_rope + store_kv in one pass: q [T, Hq, D], k, v [T, Hkv, D] (strided views of
    the qkv projection are fine) -> rotated q as fp32 [T, Hq, D] (what the attention op
    reads); the rotated k and v are written into the caches at slot_mapping [T]."""
    load()
    return torch.ops.asyncengine_cpu.rope_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)


def pack_linear_weight(w: torch.Tensor) -> torch.Tensor | None:
    """A weight [N, K] in the layout packed_linear_cpu reads, or None where this dtype has
    no batch-invariant kernel here (its GEMMs stay with oneDNN/MKL in row tiles).
    fp32: groups of 48 columns (a register tile's), each stored [K, 48], in a tensor of size
    [ceil(N/16), K, 16].
    bf16 (CPUs with AMX or AVX512-BF16): 16-column panels of VNNI pairs, [P, Kp / 2, 16, 2]
    (both bf16 kernels read this layout)."""
    if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
        return None
    load()
    if w.dtype == torch.float32:
        return torch.ops.asyncengine_cpu.pack_linear_weight(w)
    return torch.ops.asyncengine_cpu.pack_linear_weight_bf16(w) if bf16_gemm_kernel() is not None else None


@functools.cache
def bf16_gemm_kernel() -> str | None:
    """The bf16 GEMM packed_linear_cpu runs on this CPU: "amx" (tile unit), "avx512"
    (AVX512-BF16 without AMX: VDPBF16PS on AMD Zen 4, bf16 widened to fp32 FMAs on Intel,
    where VDPBF16PS does half the multiply-adds of FMA), or None (bf16 stays with oneDNN in row tiles).
    Asked once per process: every bf16 linear layer asks, and the two op calls cost ~4 us."""
    load()
    if torch.ops.asyncengine_cpu.amx_available():
        return "amx"
    return "avx512" if torch.ops.asyncengine_cpu.avx512_bf16_available() else None


def packed_linear_cpu(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int,
                      next_packed: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, K] @ W^T (+ bias) -> [T, n] in x's dtype, on a weight from pack_linear_weight.
    next_packed: the packing the caller multiplies by next, which the AVX-512 kernels (fp32,
    bf16 without AMX) hint into cache as they end (a hint: values never change).
    Each output element is computed by the same operations whatever the other rows (fp32:
    FMA chains over 64-k blocks, summed in order; bf16: AMX tile dot products over k-blocks in order, in
    fp32, rounded once; or, without AMX, VDPBF16PS steps over k-pairs in order, or on Intel one FMA
    per k on bf16 widened to fp32, in fp32, rounded once), so rows are invariant to the batch by construction (no row tiles)."""
    load()
    if next_packed is not None and next_packed.dtype != packed.dtype:
        next_packed = None  # another kernel's layout: nothing this one can place
    if packed.dtype == torch.bfloat16:
        b = None if bias is None else bias.float()
        if bf16_gemm_kernel() == "amx":
            return torch.ops.asyncengine_cpu.packed_linear_bf16(x, packed, b, n)
        return torch.ops.asyncengine_cpu.packed_linear_bf16_avx512(x, packed, b, n, None, next_packed)
    return torch.ops.asyncengine_cpu.packed_linear(x.contiguous(), packed, bias, n, next_packed)


def gemm_kernel(dtype: torch.dtype) -> str:
    """The kernel packed_linear_cpu runs on a packing of `dtype`: "fp32", "amx" or "avx512".
    Asked through bf16_gemm_kernel(), so whatever picks the Python loop's bf16 kernel (a test
    forcing "avx512" on an AMX CPU) picks decoder_layers_cpu's too."""
    if dtype == torch.float32:
        return "fp32"
    return "amx" if bf16_gemm_kernel() == "amx" else "avx512"


def decoder_layers_cpu(
    h: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None], dims: list[int],
    meta: AttentionMetadata, cos_sin: torch.Tensor, kv: list[torch.Tensor], scale: float, eps: float, gemm: str,
    groups: list[int] | None = None,
) -> torch.Tensor:
    """Every decoder layer of a step, then the final norm, as one op
    (kernels/csrc/decoder_layers_cpu.cpp): the ops above in the Python loop's order, with its
    arguments, so the same bits. h: [T, H] embeddings -> [T, H]. weights: per layer
    [attn_norm, qkv, o, mlp_norm, gate_up, down] (GEMM weights as packed), the final norm, and
    optionally the head's packing (the last GEMM's cache hint); biases: per layer [qkv, o,
    gate_up, down]; dims: [heads, kv_heads, head_dim, the four GEMMs' outputs]; kv: per layer
    [k_cache, v_cache]; gemm: gemm_kernel() of the packings; groups: sequence indices cutting
    the batch into groups a thread each (kernels/layer_groups.py chooses them when None; the
    bits are the same for any)."""
    load()
    if groups is None:
        groups = layer_groups(meta.query_start_loc_list, meta.seq_lens_list, torch.get_num_threads(),
                              MIN_ROWS_PER_WEIGHT_BYTE * h.element_size())
    return torch.ops.asyncengine_cpu.decoder_layers(
        h, weights, biases, dims, meta.positions, cos_sin, kv, meta.slot_mapping, meta.query_start_loc,
        meta.seq_lens, meta.block_tables, scale, eps, gemm, groups)
