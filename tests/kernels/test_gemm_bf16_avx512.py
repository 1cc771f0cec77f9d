

def test_engine_on_the_avx512_kernel_is_batch_invariant(tiny_dirs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # What an AMD (no AMX) CPU runs, forced here: a bf16 engine whose linear layers take
    # this kernel gives a request the same bits alone (1 thread) as among 63 others
    # (2 threads, chunked prefill of 64 tokens).
    import random

    from tests.invariance_harness import Req, make_engine, random_prompt, run, sampled

    picked: list[str] = []

    def avx512() -> str:
        picked.append("avx512")
        return "avx512"

    monkeypatch.setattr(attention_cpu, "bf16_gemm_kernel", avx512)
    rng = random.Random(3)
    needle = Req("needle", random_prompt(rng, 37, 384), sampled(12345))
    others = [Req(f"o{i}", random_prompt(rng, rng.randint(1, 200), 384), sampled(i)) for i in range(63)]
    opts = {"num_kv_blocks": 1024, "dtype": "bfloat16"}
    want = run(make_engine(tiny_dirs["llama"], num_threads=1, **opts), [needle])["needle"]
    got = run(make_engine(tiny_dirs["llama"], num_threads=2, max_num_batched_tokens=64, **opts),
              others[:20] + [needle] + others[20:])["needle"]
    assert picked, "the engine never asked for the bf16 kernel"
    assert len(want.token_ids) > 0 and got == want
