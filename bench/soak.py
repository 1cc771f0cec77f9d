"""Soak: a long run of mixed traffic against a real `asyncengine serve` process.

Traffic (W concurrent workers, bounded in time): streamed completions and chats, full
responses, n=2, client cancels mid-stream, bad requests, tokenize calls; a weight update
every U seconds (modes keep, recompute, abort in turn, from safetensors checkpoints in
the allowed directory) and a short pause/resume now and then. Every S seconds it samples
the server's RSS, /metrics (KV blocks, requests, event-loop tasks) and the latencies of
the requests completed since the last sample. At the end the traffic stops and the
server must be idle: nothing running or waiting, every KV block free, the event-loop
task count back to its idle level.

Verdicts: memory growth after warm-up <= 2% (median of the last tenth vs the first
sample after warm-up), for RSS and for anonymous memory (RssAnon: the heap, where a
leak shows; RSS also moves when the kernel drops file-backed pages), no leaked blocks or tasks, p99 latency stable (last third vs
first third after warm-up). Writes the RSS and latency curves as a PNG.

    nice -n 5 python bench/soak.py --minutes 30 --png docs/soak.png   # tiny random model
    python bench/soak.py --minutes 2 --model /path/to/ckpt             # another checkpoint
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # before bench/: kernels.py shadows

import aiohttp  # noqa: E402
import psutil  # noqa: E402
import server_process  # noqa: E402  (bench/, beside this script)

ADMIN = "soak-admin"
API = "soak-api"


@dataclass(slots=True)
class Sample:
    t: float
    rss_mb: float
    # Anonymous resident memory (heap, tensors: where a leak grows). RSS also counts
    # file-backed pages (mapped weights, libraries) that the kernel may drop under memory
    # pressure from other processes, which moves RSS by 100+ MB on a shared machine.
    anon_mb: float
    p50_ms: float | None
    p99_ms: float | None
    completed: int
    metrics: dict[str, float]


@dataclass(slots=True)
class State:
    t0: float
    deadline: float
    latencies: list[float] = field(default_factory=list)  # ms, since the last sample
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    updates: list[tuple[float, str]] = field(default_factory=list)

    def count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1


def make_checkpoints(root: Path, n: int) -> tuple[Path, list[Path]]:
    """A tiny random Llama (long context) and n perturbed copies of its weights."""
    import torch
    from safetensors.torch import load_file, save_file

    from tests.tiny_models import make_model_dir

    model = make_model_dir(root / "model", "llama", seed=0, max_position_embeddings=1024)
    state = load_file(str(next(model.glob("*.safetensors"))))
    steps = []
    for k in range(n):
        g = torch.Generator().manual_seed(k)
        noisy = {name: (t + 1e-3 * torch.randn(t.shape, generator=g, dtype=t.dtype)).contiguous()
                 for name, t in state.items()}
        (root / "weights" / f"step-{k}").mkdir(parents=True)
        save_file(noisy, str(root / "weights" / f"step-{k}" / "model.safetensors"))
        steps.append(root / "weights" / f"step-{k}")
    return model, steps


async def _stream(s: aiohttp.ClientSession, url: str, path: str, body: dict, cancel_after: int | None) -> str:
    async with s.post(url + path, json={**body, "stream": True}) as resp:
        if resp.status != 200:
            return f"status {resp.status}"
        n = 0
        async for line in resp.content:
            if line.startswith(b"data: [DONE]"):
                return "ok"
            if line.startswith(b"data: "):
                n += 1
                if b'"error"' in line:
                    return "error event"
                if cancel_after is not None and n >= cancel_after:
                    return "cancelled"  # leaving the context manager drops the connection
    return "no [DONE]"


async def _one(s: aiohttp.ClientSession, url: str, rng: random.Random) -> tuple[str, str]:
    """One request of a random kind; returns (kind, outcome)."""
    prompt = [rng.randrange(3, 384) for _ in range(rng.randrange(4, 120))]
    body = {"prompt": prompt, "max_tokens": rng.randrange(1, 48), "temperature": 1.0, "seed": rng.randrange(1000),
            "logprobs": rng.choice([None, 2])}
    chat = {"messages": [{"role": "user", "content": "Hello world! " * rng.randrange(1, 20)}],
            "max_tokens": rng.randrange(1, 32)}
    kind = rng.choices(["stream", "chat_stream", "full", "n2", "cancel", "bad", "tokenize"],
                       [35, 15, 20, 5, 15, 5, 5])[0]
    if kind == "stream":
        return kind, await _stream(s, url, "/v1/completions", body, None)
    if kind == "chat_stream":
        return kind, await _stream(s, url, "/v1/chat/completions", chat, None)
    if kind == "cancel":
        return kind, await _stream(s, url, "/v1/completions", {**body, "max_tokens": 200}, rng.randrange(1, 6))
    if kind == "bad":
        async with s.post(url + "/v1/completions", json={**body, "top_p": 7}) as resp:
            return kind, "ok" if resp.status == 400 else f"status {resp.status}"
    if kind == "tokenize":
        async with s.post(url + "/tokenize", json={"prompt": "Hello world " * 5}) as resp:
            return kind, "ok" if resp.status == 200 else f"status {resp.status}"
    async with s.post(url + "/v1/completions", json={**body, "n": 2 if kind == "n2" else 1}) as resp:
        await resp.read()
        return kind, "ok" if resp.status == 200 else f"status {resp.status}"


async def worker(s: aiohttp.ClientSession, url: str, st: State, seed: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < st.deadline:
        t = time.perf_counter()
        kind, outcome = await _one(s, url, rng)
        st.count(f"{kind}:{outcome}")
        if outcome == "ok" and kind not in ("bad", "tokenize"):
            st.latencies.append((time.perf_counter() - t) * 1e3)
        elif outcome not in ("ok", "cancelled") and not (kind != "cancel" and outcome == "status 503"):
            st.errors.append(f"{kind}: {outcome}")


async def admin_loop(s: aiohttp.ClientSession, url: str, st: State, steps: list[Path], every_s: float) -> None:
    """A weight update every `every_s` seconds (modes in turn), a short pause every third."""
    auth = {"Authorization": f"Bearer {ADMIN}"}
    k = 0
    while time.monotonic() + every_s < st.deadline:
        await asyncio.sleep(every_s)
        mode = ("keep", "recompute", "abort")[k % 3]
        async with s.post(url + "/update_weights", json={"path": str(steps[k % len(steps)]), "mode": mode},
                          headers=auth) as resp:
            st.count(f"update_{mode}:{resp.status}")
            if resp.status != 200:
                st.errors.append(f"update {mode}: {resp.status} {await resp.text()}")
        st.updates.append((time.monotonic() - st.t0, mode))
        if k % 3 == 2:
            async with s.post(url + "/pause?mode=keep", headers=auth) as resp:
                st.count(f"pause:{resp.status}")
            await asyncio.sleep(0.5)
            async with s.post(url + "/resume", headers=auth) as resp:
                st.count(f"resume:{resp.status}")
        k += 1


async def scrape(s: aiohttp.ClientSession, url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    async with s.get(url + "/metrics") as resp:
        text = await resp.text()
    out = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if not smp.labels:
                out[smp.name.removeprefix("asyncengine_")] = smp.value
    return out


def _anon_mb(proc: psutil.Process) -> float:
    """RssAnon of /proc/PID/status, in MB."""
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/PID/status")


async def _idle_scrape(url: str, headers: dict[str, str]) -> dict[str, float]:
    """/metrics over a connection of its own, closed after (one server task while it lasts)."""
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(force_close=True)) as s:
        return await scrape(s, url)


async def sampler(s: aiohttp.ClientSession, url: str, st: State, proc: psutil.Process, every_s: float,
                  samples: list[Sample]) -> None:
    while time.monotonic() < st.deadline:
        await asyncio.sleep(every_s)
        lat, st.latencies = st.latencies, []
        q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else None
        samples.append(Sample(time.monotonic() - st.t0, proc.memory_info().rss / 2**20, _anon_mb(proc),
                              q[49] if q else None,
                              q[98] if q else None, len(lat), await scrape(s, url)))
        m = samples[-1]
        print(f"t={m.t:7.0f}s rss={m.rss_mb:7.1f} MB anon={m.anon_mb:7.1f} MB p50={m.p50_ms or 0:7.1f} ms p99={m.p99_ms or 0:7.1f} ms "
              f"done={m.completed} kv_free={m.metrics.get('kv_cache_free_blocks')} "
              f"tasks={m.metrics.get('event_loop_tasks')}", flush=True)


def verdicts(samples: list[Sample], warmup_s: float, idle: dict[str, float], idle_tasks0: float) -> dict[str, object]:
    after = [x for x in samples if x.t >= warmup_s] or samples
    tail = after[-max(1, len(after) // 10):]
    base, base_anon = after[0].rss_mb, after[0].anon_mb
    growth = (statistics.median(x.rss_mb for x in tail) - base) / base
    anon_growth = (statistics.median(x.anon_mb for x in tail) - base_anon) / base_anon
    third = max(1, len(after) // 3)
    first_p99 = statistics.median(x.p99_ms for x in after[:third] if x.p99_ms is not None)
    last_p99 = statistics.median(x.p99_ms for x in after[-third:] if x.p99_ms is not None)
    leaked_blocks = idle["kv_cache_total_blocks"] - idle["kv_cache_free_blocks"]
    return {
        "rss_after_warmup_mb": round(base, 1), "rss_end_mb": round(tail[-1].rss_mb, 1),
        "rss_growth_pct": round(100 * growth, 2), "anon_after_warmup_mb": round(base_anon, 1),
        "anon_end_mb": round(tail[-1].anon_mb, 1), "anon_growth_pct": round(100 * anon_growth, 2),
        "rss_min_max_after_warmup_mb": [round(min(x.rss_mb for x in after), 1), round(max(x.rss_mb for x in after), 1)],
        "rss_ok": growth <= 0.02 and anon_growth <= 0.02,
        "p99_first_third_ms": round(first_p99, 1), "p99_last_third_ms": round(last_p99, 1),
        "p99_ratio": round(last_p99 / first_p99, 3), "p99_stable": last_p99 <= 1.25 * first_p99,
        "idle_running": idle["num_requests_running"], "idle_waiting": idle["num_requests_waiting"],
        "leaked_blocks": leaked_blocks, "idle_tasks_before": idle_tasks0, "idle_tasks_after": idle["event_loop_tasks"],
        "no_leaks": leaked_blocks == 0 and idle["num_requests_running"] == 0 and idle["num_requests_waiting"] == 0
        and idle["event_loop_tasks"] <= idle_tasks0,
    }


def plot(samples: list[Sample], updates: list[tuple[float, str]], warmup_s: float, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [x.t / 60 for x in samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax1.plot(t, [x.rss_mb for x in samples], color="tab:blue", label="RSS")
    ax1.plot(t, [x.anon_mb for x in samples], color="tab:green", label="anonymous (RssAnon)")
    ax1.set_ylabel("server memory (MB)")
    ax1.legend(loc="center right", fontsize=8)
    ax1.set_title(title, fontsize=9)
    ax2.plot(t, [x.p50_ms for x in samples], label="p50")
    ax2.plot(t, [x.p99_ms for x in samples], label="p99")
    ax2.set_ylabel("request latency (ms)")
    ax2.set_xlabel("minutes")
    for ax in (ax1, ax2):
        ax.axvline(warmup_s / 60, color="grey", ls="--", lw=0.8)
        for u, _ in updates:
            ax.axvline(u / 60, color="tab:red", alpha=0.15, lw=0.8)
    ax2.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


async def run(a: argparse.Namespace, url: str, proc: psutil.Process, steps: list[Path]) -> dict[str, object]:
    t0 = time.monotonic()
    st = State(t0=t0, deadline=t0 + a.minutes * 60)
    samples: list[Sample] = []
    headers = {"Authorization": f"Bearer {API}"}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=120)) as s, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as admin:
        idle0 = await _idle_scrape(url, headers)
        tasks = [worker(s, url, st, a.seed * 1000 + i) for i in range(a.workers)]
        tasks += [admin_loop(admin, url, st, steps, a.update_every), sampler(s, url, st, proc, a.sample_every, samples)]
        await asyncio.gather(*tasks)
    # Clients closed (their keep-alive connections too, each a server task): now idle.
    await asyncio.sleep(2.0)
    idle = await _idle_scrape(url, headers)
    warmup = min(a.warmup_minutes * 60, a.minutes * 60 / 5)
    out = {"minutes": a.minutes, "workers": a.workers, "counts": dict(sorted(st.counts.items())),
           "errors": st.errors[:20], "num_errors": len(st.errors), "weight_updates": len(st.updates),
           **verdicts(samples, warmup, idle, idle0["event_loop_tasks"])}
    if a.png:
        title = (f"soak {a.minutes:g} min, {a.workers} workers, {len(st.updates)} weight updates; "
                 f"growth after warm-up: RSS {out['rss_growth_pct']}%, anonymous {out['anon_growth_pct']}%; "
                 f"p99 last/first third {out['p99_ratio']}")
        plot(samples, st.updates, warmup, Path(a.png), title)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--warmup-minutes", type=float, default=3.0, help="excluded from the RSS and p99 verdicts")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--update-every", type=float, default=30.0, help="seconds between weight updates")
    p.add_argument("--sample-every", type=float, default=10.0)
    p.add_argument("--model", default=None, help="checkpoint to serve (default: a tiny random Llama)")
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default=None, help="write the RSS and latency curves here")
    p.add_argument("--json", default=None, help="write the figures here")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, steps = make_checkpoints(Path(tmp), 3)
        if a.model:
            raise SystemExit("--model: weight updates need checkpoints of that model; only the tiny model is wired")
        flags = ["--model", str(model), "--num-kv-blocks", "512", "--num-threads", str(a.num_threads),
                 "--api-key", API, "--admin-key", ADMIN, "--allowed-weights-dir", str(Path(tmp) / "weights"),
                 "--max-waiting", "64"]
        proc, url = server_process.start_server(flags, Path(tmp) / "server.log")
        try:
            out = asyncio.run(run(a, url, psutil.Process(proc.pid), steps))
        finally:
            proc.terminate()
            out_code = proc.wait(60)
        out["server_exit_code"] = out_code
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
