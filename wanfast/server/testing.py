"""A real ``wanfast serve`` process on a free loopback port, for tests and demos.

Every wait here is bounded in time; the server only ever binds 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def wait_job(client, job_id: str, until, timeout: float = 60.0, interval: float = 0.1) -> dict:
    """Poll ``GET /v1/videos/{id}`` until ``until(job)`` holds; returns that job."""

    def check():
        job = client.get(f"/v1/videos/{job_id}").raise_for_status().json()
        return job if until(job) else None

    return wait_for(check, timeout, f"job {job_id} to reach the expected state", interval=interval)


def wait_final(client, job_id: str, timeout: float = 60.0) -> dict:
    return wait_job(client, job_id, lambda j: j["state"] in ("succeeded", "failed", "cancelled"), timeout)


def burst(server: ServerProcess, body: dict, n: int = 50) -> list:
    """``n`` submissions at once (one connection each); returns the responses."""
    import asyncio

    import httpx

    async def run() -> list:
        headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30, limits=limits) as c:
            return await asyncio.gather(*(c.post("/v1/videos", json=body) for _ in range(n)))

    return asyncio.run(run())


class _Child:
    """A ``wanfast`` subprocess of a test: ``kill`` (SIGKILL: no handler, no cleanup, as a host that
    vanishes; its workers exit on their own when their stdin pipe closes) and ``stop`` (SIGTERM, then
    SIGKILL after 30 s)."""

    proc: subprocess.Popen | None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


class ServerProcess(_Child):
    """``python -m wanfast serve --model tiny`` with its output in ``<data_dir>/server-<n>.log``."""

    def __init__(
        self, data_dir: str | Path, *extra_args: str, api_key: str | None = None, wait_workers: bool = True
    ) -> None:
        """``wait_workers``: ``start`` waits until every worker has its model loaded (False: until the web
        process answers, as an ``--api-only`` one does before any worker has joined)."""
        self.data_dir, self.extra_args, self.api_key = Path(data_dir), extra_args, api_key
        self.wait_workers = wait_workers
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = self.data_dir / "server.log"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 120.0) -> ServerProcess:
        """Start and wait until ``/health`` says every worker has its model loaded."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "WANFAST_API_KEY"}
        if self.api_key is not None:
            env["WANFAST_API_KEY"] = self.api_key  # by environment: a key on the command line shows in ps
        runs = len(list(self.data_dir.glob("server*.log")))
        self.log_path = self.data_dir / f"server-{runs}.log"
        with open(self.log_path, "wb") as log:
            cmd = [sys.executable, "-m", "wanfast", "serve", "--model", "tiny", "--host", HOST]
            cmd += ["--port", str(self.port), "--data-dir", str(self.data_dir), *self.extra_args]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_for(self._ready, timeout, f"the server to be ready (log: {self.log_path})", interval=0.2)
        return self

    def _ready(self) -> bool:
        import httpx

        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with code {self.proc.returncode}:\n{self.log()}")
        try:
            r = httpx.get(f"{self.url}/health", timeout=2)
            return not self.wait_workers or (r.status_code == 200 and r.json()["status"] == "ok")
        except httpx.TransportError:
            return False

    def client(self, **kwargs):
        """An ``httpx.Client`` for this server, sending the API key if there is one."""
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kwargs.pop("timeout", 15), **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def workers(self) -> dict[tuple[str, int], int]:
        """Live worker processes started for this data directory (by any server run): (worker name, rank)
        -> pid."""
        found = {}
        for entry in Path("/proc").iterdir():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                stat = (entry / "stat").read_text()
            except (OSError, ValueError):
                continue  # not a process, or gone meanwhile
            if stat.rpartition(")")[2].split()[0] == "Z" or b"wanfast.server.worker" not in cmdline:
                continue
            try:
                cfg, slot = (
                    json.loads(a) for a in cmdline[cmdline.index(b"wanfast.server.worker") + 1 :][:2]
                )
            except (ValueError, IndexError):
                continue
            if Path(cfg["data_dir"]) == self.data_dir.resolve():
                found[(slot["name"], slot["rank"])] = int(entry.name)
        return found

    def worker_pids(self) -> list[int]:
        return sorted(self.workers().values())

    def run_to_exit(self, timeout: float = 120.0) -> tuple[int, str]:
        """Start ``serve`` expecting it to refuse: (exit code, its output)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "wanfast", "serve", "--model", "tiny", "--host", HOST, "--port",
               str(free_port()), "--data-dir", str(self.data_dir), *self.extra_args]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class WorkerProcess(_Child):
    """``python -m wanfast worker --model tiny`` (a worker pool with no HTTP, on a PostgreSQL store), with
    its output in ``<data_dir>/worker.log``."""

    def __init__(self, data_dir: str | Path, *extra_args: str, env: dict | None = None) -> None:
        """``env``: variables added to its environment (e.g. ``WANFAST_STORE``)."""
        self.data_dir, self.extra_args, self.env = Path(data_dir), extra_args, env or {}
        self.log_path = self.data_dir / "worker.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "wanfast", "worker", "--model", "tiny", "--data-dir", str(self.data_dir),
               *self.extra_args]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""
