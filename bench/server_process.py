"""Start `asyncengine serve` as a child process on a free localhost port (for benches)."""
from __future__ import annotations

import os
import resource
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


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset the kernel's peak-RSS mark of a process (Linux); False where it cannot."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(pid: int | str = "self") -> int:
    """A process's peak resident set since the last reset_peak_rss (else since it started);
    for this process, the rusage figure where /proc cannot say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        if pid != "self":
            raise
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ChildProcess:
    """A server child process (`proc`) the benches measure from outside, through /proc:
    its CPU time, its peak RSS (reset before a timed run), and stopping it."""

    proc: subprocess.Popen[bytes]

    def reset_peak_rss(self) -> None:
        reset_peak_rss(self.proc.pid)

    def peak_rss_bytes(self) -> int:
        return peak_rss_bytes(self.proc.pid)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
