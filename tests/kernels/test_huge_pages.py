"""Host memory on huge pages (kernels/huge_pages.py) and the model's packings placed there."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asyncengine.config import EngineConfig
from asyncengine.engine_core import EngineCore
from asyncengine.models.llama import LlamaModel
from kernels import huge_pages
from kernels.huge_pages import HUGE_PAGE, Arena


def test_empty_bytes_is_aligned_to_a_huge_page() -> None:
    for n in (0, 1, HUGE_PAGE - 1, 3 * HUGE_PAGE + 5):
        t = huge_pages.empty_bytes(n)
        assert t.dtype == torch.uint8 and t.numel() == n and t.data_ptr() % HUGE_PAGE == 0
        t.fill_(7)  # every byte is writable


def test_zeros_are_zeros_of_the_shape() -> None:
    z = huge_pages.zeros((3, 5, 7), torch.bfloat16)
    assert z.shape == (3, 5, 7) and z.dtype == torch.bfloat16 and z.is_contiguous()
    assert torch.equal(z, torch.zeros(3, 5, 7, dtype=torch.bfloat16))


def test_arena_places_copies_page_aligned_in_shared_slabs() -> None:
    arena = Arena(slab_bytes=1 << 20)
    src = [torch.randn(100, 7), torch.arange(10, dtype=torch.int64), torch.randn(3, 4).bfloat16(), torch.randn(2)]
    placed = [arena.place(t) for t in src]
    for s, p in zip(src, placed):
        assert p.dtype == s.dtype and p.shape == s.shape and torch.equal(p, s)
        assert p.data_ptr() % 4096 == 0 and p.data_ptr() != s.data_ptr()
    # Small tensors share one slab, one after another.
    assert len({p.untyped_storage().data_ptr() for p in placed}) == 1
    assert placed[1].data_ptr() - placed[0].data_ptr() == -(-100 * 7 * 4 // 4096) * 4096
    src[0].fill_(0)  # a copy: the source is free to change
    assert not torch.equal(placed[0], src[0])


def test_arena_gives_a_large_tensor_its_own_slab() -> None:
    arena = Arena(slab_bytes=1 << 16)
    small = arena.place(torch.ones(100))
    big = arena.place(torch.randn(1 << 15))  # 128 KB: past the slab size
    after = arena.place(torch.ones(10))
    assert big.untyped_storage().data_ptr() != small.untyped_storage().data_ptr()
    assert big.data_ptr() % HUGE_PAGE == 0
    assert after.untyped_storage().data_ptr() not in {s.untyped_storage().data_ptr() for s in (small, big)}
    assert torch.equal(after, torch.ones(10))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_placed_packings_serve_the_same_bits(llama_dir: Path, dtype: str) -> None:
    """repack() places the backend's packings in huge-page slabs; the model computes the
    same bits as with the packings where pack_linear left them."""
    core = EngineCore(EngineConfig(model=str(llama_dir), dtype=dtype, num_kv_blocks=16, num_threads=1))
    model = core.model
    packs = model.packings()
    if not packs:
        pytest.skip(f"no batch-invariant {dtype} GEMM of our own on this CPU (oneDNN packs instead)")
    slabs = {p.untyped_storage().data_ptr() for p in packs}
    assert len(slabs) < len(packs) and all(p.data_ptr() % 4096 == 0 for p in packs)
    for slab in slabs:  # each slab starts on a huge page
        assert min(p.data_ptr() for p in packs if p.untyped_storage().data_ptr() == slab) % HUGE_PAGE == 0
    x = torch.randn(5, model.args.hidden_size).to(model.dtype)
    w = model.layers[0].gate_up
    placed = model._linear(x, w, None)
    model.repack(place=lambda packed: packed)  # where pack_linear left them
    assert not any(p.untyped_storage().data_ptr() in slabs for p in model.packings())
    assert torch.equal(model._linear(x, w, None), placed)


def test_each_gemm_hints_the_next_ones_packing_except_across_attention() -> None:
    """gemm_weights() is in call order (per layer qkv, o, gate_up, down; then the head):
    each packing's next is the following one, but qkv's (attention reads the KV cache in
    between) and the head's (the step's last)."""
    owns = [torch.full((1,), float(i)) for i in range(9)]  # two layers and the head
    owns[6] = None  # a weight left to oneDNN: nothing of ours to hint
    nexts = [LlamaModel._next_packing(owns, i) for i in range(9)]
    assert nexts[0] is None and nexts[4] is None and nexts[8] is None
    assert nexts[1] is owns[2] and nexts[2] is owns[3] and nexts[3] is owns[4] and nexts[7] is owns[8]
    assert nexts[5] is None  # the next is oneDNN's
