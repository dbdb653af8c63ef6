"""Start a server in a subprocess on a free loopback port, wait until it is healthy, stop it with SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]

# The real model on a small KV pool and context, so that tests stay quick on two cores. One
# PyTorch thread: the test process's clients share the cores, and two OpenMP threads on two
# busy cores stall each other at every barrier (measured: over 10x slower per token).
REAL_SERVER_ARGS = ["--model", "smollm2-135m", "--kv-cache-tokens", "4096", "--max-model-len", "256",
                    "--max-num-seqs", "64", "--max-queue", "512", "--threads", "1", "--log-level", "warning"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, command: list[str], port: int, log_path: Path, ready_timeout: float = 180.0) -> None:
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode} while starting:\n{self.output()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"server not healthy after {ready_timeout} s:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        return self.log_path.read_text()

    def terminate(self) -> None:
        """Send SIGTERM (the server drains, then exits)."""
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.terminate()
        return self.wait(timeout)


def real_server(log_path: Path) -> ServerProcess:
    port = free_port()
    return ServerProcess([sys.executable, "-m", "thrifty.cli", "serve", "--port", str(port), *REAL_SERVER_ARGS], port,
                         log_path)


def fake_server(step_seconds: float, log_path: Path) -> ServerProcess:
    port = free_port()
    return ServerProcess([sys.executable, "-m", "tests.server_fakes", str(port), str(step_seconds)], port, log_path)
