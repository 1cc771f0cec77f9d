"""Our own server as a side of bench/throughput.py, driven from outside the way llama.cpp's
is (bench/llamacpp.py): `asyncengine serve` in a child process, the same prompts as token
ids all sent at once as plain non-streaming POST /v1/completions (greedy, ignore_eos,
exactly the new tokens), and the server process's own CPU time and peak RSS.

The server starts for its turn and stops after it, so the in-process engine, HF and
llama-server never share the memory with it; its KV pool is sized to the workload (every
sequence's blocks at once) rather than from the memory the in-process engine left.
"""
from __future__ import annotations

import json
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.server_process import ChildProcess, start_server


class HttpError(RuntimeError):
    """Our server refused or failed a completion (the bench stops: that is our bug)."""


class OursServer(ChildProcess):
    """`asyncengine serve` on a free localhost port with the engine flags given."""

    def __init__(self, flags: list[str], log: Path) -> None:
        self.proc, self.url = start_server(flags, log)

    def complete(self, prompt: list[int], new_tokens: int) -> int:
        """One greedy completion of exactly `new_tokens`; returns usage.completion_tokens."""
        body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}
        req = urllib.request.Request(self.url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=3600) as r:
                return int(json.load(r)["usage"]["completion_tokens"])
        except urllib.error.HTTPError as e:
            raise HttpError(f"our server answered {e.code}: {e.read().decode(errors='replace')[:300]}") from e


def kv_blocks_for(prompts: list[list[int]], new_tokens: int, block_size: int) -> int:
    """Blocks for every sequence of the workload at its full length at once, plus one each."""
    return sum(-(-(len(p) + new_tokens) // block_size) + 1 for p in prompts)


def run_ours_http(flags: list[str], prompts: list[list[int]], new_tokens: int) -> tuple[float, float, int]:
    """Start the server, warm it up on two prompts outside the set (so nothing measured hits
    their cached blocks), then all `prompts` at once; returns (wall s, server CPU s, server
    peak RSS) and stops the server."""
    server = OursServer(flags, Path(tempfile.gettempdir()) / "asyncengine-http-side.log")
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            warm = [list(reversed(p)) + [p[0] + 1] for p in prompts[:2]]  # no block shared with any prompt
            assert all(n == 4 for n in pool.map(lambda p: server.complete(p, 4), warm))
            server.reset_peak_rss()
            t, c = time.perf_counter(), server.cpu_seconds()
            made = list(pool.map(lambda p: server.complete(p, new_tokens), prompts))
            wall, cpu = time.perf_counter() - t, server.cpu_seconds() - c
        if made != [new_tokens] * len(prompts):
            raise HttpError(f"our server made {made} tokens, not {new_tokens} each")
        return wall, cpu, server.peak_rss_bytes()
    finally:
        server.close()
