"""`asyncengine serve` as a child process (the rollout server of the RL loop)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    """with ServerProcess(["--model", d, "--admin-key", k]) as srv: srv.url ..."""

    def __init__(self, flags: list[str], log: Path, startup_timeout_s: float = 300.0) -> None:
        self.flags, self.log, self.startup_timeout_s = flags, log, startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> ServerProcess:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "asyncengine.cli", "serve", "--port", str(port),
                                          *self.flags], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1):
                    return self
            except OSError:
                time.sleep(0.3)
        self.close()
        raise TimeoutError(f"the server did not answer /health within {self.startup_timeout_s} s")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
