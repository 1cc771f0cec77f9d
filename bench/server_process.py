"""Start `asyncengine serve` as a child process on a free localhost port (for benches)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server(
    flags: list[str], log: Path, timeout: float = 300.0, module: tuple[str, ...] = ("asyncengine.cli", "serve")
) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m asyncengine.cli serve --port P *flags` (or another `module` taking the
    same flags); returns (process, base url) once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", *module, "--port", str(port), *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        # cwd = repo root: from bench/, bench/kernels.py would shadow the kernels package.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError("server did not start")


class ChildProcess:
    """A server child process (`proc`) the benches measure from outside, through /proc:
    its CPU time, its peak RSS (reset before a timed run), and stopping it."""

    proc: subprocess.Popen[bytes]

    def _proc_file(self, name: str) -> str:
        return Path(f"/proc/{self.proc.pid}/{name}").read_text()

    def reset_peak_rss(self) -> None:
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        except OSError:
            pass

    def peak_rss_bytes(self) -> int:
        line = next(x for x in self._proc_file("status").splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    def cpu_seconds(self) -> float:
        fields = self._proc_file("stat").rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
