"""The llama.cpp peer's GGUF conversion (bench/llamacpp_gguf.py), its binary lookup, our own
server as an outside side (bench/ours_http.py), the throughput report with those sides, and
the decode batch curve (bench/batch_curve.py)."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from bench.batch_curve import Point, decode_run, plot, prompts, table
from bench.llamacpp import find_binary
from bench.llamacpp_gguf import verify, write_dense
from bench.ours_http import HttpError, OursServer, kv_blocks_for, run_ours_http
from bench.throughput import Side, report


def _q4_1_gguf(path: Path) -> Path:
    """A two-tensor Q4_1 GGUF with metadata of every kind the real file has."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_token_list(["<a>", "<b>", "hello"])
    w.add_token_types([1, 3, 1])
    w.add_float32("llama.rope.freq_base", 100000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    weight = rng.standard_normal((8, 64)).astype(np.float32)  # [rows, cols]: 2 Q4_1 blocks per row
    q = gguf.quantize(weight, gguf.GGMLQuantizationType.Q4_1)
    w.add_tensor("blk.0.attn_q.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    w.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(64).astype(np.float32))
    embd = gguf.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("token_embd.weight", embd, raw_shape=embd.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_f32_gguf_holds_exactly_the_dequantized_weights(tmp_path: Path) -> None:
    src = _q4_1_gguf(tmp_path / "q.gguf")
    dst = write_dense(src, tmp_path / "f32.gguf", "float32")
    want = {t.name: gguf.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(src).tensors}
    got = _tensors(dst)
    assert {n: t.tensor_type for n, t in got.items()} == dict.fromkeys(want, gguf.GGMLQuantizationType.F32)
    for name, weights in want.items():
        assert np.array_equal(np.asarray(got[name].data).reshape(weights.shape), weights)
    fields = gguf.GGUFReader(dst).fields
    assert fields["tokenizer.ggml.tokens"].contents() == ["<a>", "<b>", "hello"]
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    assert verify(src, dst, "float32") == 3


def test_bf16_gguf_rounds_like_torch_and_keeps_norms_and_the_head_f32(tmp_path: Path) -> None:
    src = _q4_1_gguf(tmp_path / "q.gguf")
    dst = write_dense(src, tmp_path / "bf16.gguf", "bfloat16")
    got = _tensors(dst)
    assert got["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert got["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # the tied lm_head
    assert got["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    deq = next(gguf.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(src).tensors if "attn_q" in t.name)
    bits = np.array(got["blk.0.attn_q.weight"].data).view(np.int16).reshape(deq.shape)  # a writable copy
    assert torch.equal(torch.from_numpy(bits).view(torch.bfloat16), torch.from_numpy(deq).to(torch.bfloat16))
    assert verify(src, dst, "bfloat16") == 3


def test_verify_rejects_a_file_that_differs(tmp_path: Path) -> None:
    src = _q4_1_gguf(tmp_path / "q.gguf")
    f32 = write_dense(src, tmp_path / "f32.gguf", "float32")
    with pytest.raises(ValueError, match="attn_q"):
        verify(src, f32, "bfloat16")  # an F32 file is not the bf16 rounding
    with pytest.raises(ValueError, match="dtype"):
        write_dense(src, tmp_path / "x.gguf", "float16")


def test_find_binary(tmp_path: Path) -> None:
    assert find_binary("off") is None
    with pytest.raises(SystemExit, match="no llama-server"):
        find_binary(str(tmp_path / "missing"))
    (tmp_path / "llama-server").write_text("")
    assert find_binary(str(tmp_path)) == tmp_path / "llama-server"


def test_report_prints_every_peer_and_the_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    ours, hf, llama = Side(100.0, 120.0, 2**30), Side(25.0, 30.0, 2**30), Side(50.0, 60.0, 2**29)
    rounds = [{"ours": ours, "HF": hf, "llama.cpp": llama}] * 3
    report("decode", 4, 8, bounds=(32 / 200.0, 32 / 125.0), rounds=rounds)
    out = capsys.readouterr().out
    assert "ours   100.0 tok/s ( 50.0% of SOL,  80.0% unhidden" in out  # 32 tokens: SOL 200 tok/s, bound 125
    assert "ours/HF  4.00x" in out and "ours/llama.cpp  2.00x" in out
    assert "round 1 (HF first)" in out and "round 2 (llama.cpp first)" in out
    assert "median ours/llama.cpp 2.00x" in out and "peak RSS 0.50 GiB" in out


def test_report_prints_the_http_side_against_the_peers(capsys: pytest.CaptureFixture[str]) -> None:
    ours, http, llama = Side(100.0, 120.0, 2**30), Side(80.0, 90.0, 2**29), Side(40.0, 60.0, 2**29)
    report("decode", 4, 8, bounds=(32 / 200.0, 32 / 125.0), rounds=[{"ours": ours, "ours-http": http, "llama.cpp": llama}] * 2)
    out = capsys.readouterr().out
    assert "ours/ours-http  1.25x" in out and "ours/llama.cpp  2.50x | ours-http/llama.cpp  2.00x" in out
    assert "median ours/ours-http 1.25x" in out and "median ours-http/llama.cpp 2.00x" in out
    assert "ours-http/ours-http" not in out


def test_kv_blocks_hold_every_sequence_at_its_full_length() -> None:
    # 16-token blocks: 10 + 8 -> 2 blocks, 16 + 8 -> 2, 17 + 8 -> 2; plus one each.
    assert kv_blocks_for([[1] * 10, [1] * 16, [1] * 17], 8, 16) == 9
    assert kv_blocks_for([[1] * 9], 8, 16) == 3  # 17 tokens: 2 blocks + 1


def test_ours_http_side_serves_every_token(llama_dir: Path) -> None:
    flags = ["--model", str(llama_dir), "--num-kv-blocks", "64", "--max-num-seqs", "8"]
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    wall, cpu, rss = run_ours_http(flags, prompts, 6)
    assert wall > 0 and cpu >= 0 and rss > 0  # CPU time comes in clock ticks: a short run may read 0


def test_ours_http_side_raises_on_a_refused_completion(llama_dir: Path, tmp_path: Path) -> None:
    server = OursServer(["--model", str(llama_dir), "--num-kv-blocks", "64"], tmp_path / "s.log")
    try:
        with pytest.raises(HttpError, match="answered 400"):
            server.complete([5, 6, 7], -1)  # max_tokens -1: a 400, not a hang
    finally:
        server.close()
    assert server.proc.poll() is not None


def test_batch_curve_table_and_png(tmp_path: Path) -> None:
    points = [Point("float32", b, 7 * b, 0.5, 0.25, 100.0 * b) for b in (1, 4, 16)]
    lines = table(points).splitlines()
    assert len(lines) == 4 and lines[2].split() == ["float32", "4", "56.0", "400.0", "14.0", "112.0", "28.0"]
    plot(points + [Point("bfloat16", 1, 7, 0.25, 0.25, 200.0)], tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decode_run_counts_only_the_decode_tokens(llama_dir: Path) -> None:
    from asyncengine.llm import LLM

    llm = LLM(model=str(llama_dir), num_kv_blocks=64, max_num_seqs=8)
    batch = prompts(3, llm.engine.model_info.vocab_size)
    decoded, seconds, cpu = decode_run(llm, batch, new_tokens=5)
    assert decoded == 3 * 4 and seconds > 0 and cpu >= 0
    assert not llm.engine.has_unfinished()


def test_decode_sol_is_sol_seconds_without_the_prefill() -> None:
    from bench.sol import Machine, ModelCost, decode_sol_seconds, sol_seconds

    one = Machine(fp32_flops=1.0, bf16_flops=1.0, bf16_unit="none", read_bytes=1.0, wall=(1.0, 1.0, 1.0))
    cost = ModelCost(layers=1, attn_dim=1, body_params=1, head_params=1, weight_bytes=0, kv_token_bytes=10,
                     body_bf16=False, head_bf16=False)
    # Prompts of 3 and 1 tokens, 3 new: the prefill (body 2 x 4, attention 4 x (1+2+3+1), the
    # head twice = 40; memory 4 x 10) then two decode steps of both sequences.
    assert decode_sol_seconds(cost, one, [3, 1], 3) == sol_seconds(cost, one, [3, 1], 3, 2048, 64) - 40
    # The first decode step: compute 2 x 2 + 2 x 2 + 4 x (4 + 2) = 32 < memory (4 read + 2 written) x 10.
    assert decode_sol_seconds(cost, one, [3, 1], 2) == 60
    # With the KV reads not under the FMAs the step is compute + the 4 cached tokens' KV: 32 + 40;
    # the prefill reads no cached KV and stays 40.
    assert sol_seconds(cost, one, [3, 1], 2, 2048, 64) == 40 + 60
    assert sol_seconds(cost, one, [3, 1], 2, 2048, 64, kv_hidden=False) == 40 + 72
