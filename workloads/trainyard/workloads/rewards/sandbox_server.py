"""The sandbox service: runs code-execution jobs for trainers that may not jail them.

A trainer pod under the restricted Pod Security Standard runs as uid 1000 with every
capability dropped, so it cannot make the namespaces and uid switch of strict isolation.
With `isolation: service` its code-execution reward sends each batch of programs here
instead, and this server (root with CAP_SYS_ADMIN in a pod of its own, see
`trainyard.operator.builders.sandbox`) scores them exactly as the trainer would under
strict isolation: a pool of workers, each in its own network, IPC and mount namespaces,
every program under a fresh uid with its limits.

Protocol (JSON over HTTP/1.1):

- `GET /healthz` -> `{"isolation": "strict", "workers": 8, "path": "..."}`; 503 while
  the isolation this server was started with is unavailable.
- `POST /v1/check` `{"programs": ["gcc"], "path": "/opt/bin:/usr/bin"}` ->
  `{"problems": ["program 'gcc' not found on the sandbox PATH ..."]}`.
- `POST /v1/score` `{"jobs": [ProgramJob as JSON]}` -> `{"scores": [{"score": 0.2,
  "stages": [{"name": "compile", "passed": true, "score": 1.0, "reason": "ok",
  "errors": null}, ...]}]}`, in the order of the jobs.

The server's isolation wins over the job's; `{python}` is the server's interpreter (or
the job's pythonExecutable when this server's sandbox uid may run it). It prints
`listening on URL` on stdout once it accepts requests (port 0 picks a free one).

    python -m trainyard.workloads.rewards.sandbox_server --host 0.0.0.0 --port 8750
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from trainyard.api.rewards import SANDBOX_SERVICE_PORT
from trainyard.workloads.rewards.code_execution import (
    default_workers,
    job_from_json,
    score_programs,
    shutdown_pools,
)
from trainyard.workloads.rewards.sandbox import (
    _SANDBOX_PATH,
    SandboxUnavailable,
    check_stage_program,
    require_isolation,
    sandbox_python,
)

MAX_REQUEST_BYTES = 64 * 1024 * 1024


class SandboxServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], isolation: str, workers: int):
        super().__init__(address, SandboxHandler)
        self.isolation = isolation
        self.workers = workers

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def score(self, body: dict[str, Any]) -> dict[str, Any]:
        jobs = []
        for data in body["jobs"]:
            job = job_from_json(data)
            _check_limits(job)
            python = job.python
            if self.isolation == "strict":
                python = sandbox_python(python or None)
            jobs.append(replace(job, isolation=self.isolation, python=python or sys.executable))
        return {"scores": [s.to_json() for s in score_programs(jobs, self.workers)]}

    def check(self, body: dict[str, Any]) -> dict[str, Any]:
        problems = []
        for program in body.get("programs", []):
            try:
                check_stage_program(str(program), body.get("path"))
            except ValueError as error:
                problems.append(str(error))
        return {"problems": problems}


def _check_limits(job: Any) -> None:
    """Refuse limits past the API's maxima: the service is shared, its callers untrusted
    as to what they ask for (ValueError: HTTP 400)."""
    limits = job.limits
    stage_timeouts = [s.timeout_seconds or 0 for s in job.stages]
    if max([limits.timeout_seconds, *stage_timeouts]) > 600 or limits.cpu_seconds > 3600:
        raise ValueError("timeouts above 600 s or cpuSeconds above 3600 are refused")
    if limits.max_processes > 4096 or limits.max_open_files > 65536:
        raise ValueError("maxProcesses above 4096 or maxOpenFiles above 65536 are refused")


class SandboxHandler(BaseHTTPRequestHandler):
    server: SandboxServer
    protocol_version = "HTTP/1.1"

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path != "/healthz":
            self._answer(404, {"error": f"no {self.path}; GET /healthz, POST /v1/score"})
            return
        try:
            require_isolation(self.server.isolation)
        except SandboxUnavailable as error:
            self._answer(503, {"error": str(error)})
            return
        self._answer(
            200,
            {
                "isolation": self.server.isolation,
                "workers": self.server.workers,
                "path": _SANDBOX_PATH,
            },
        )

    def do_POST(self) -> None:  # noqa: N802
        routes = {"/v1/score": self.server.score, "/v1/check": self.server.check}
        if self.path not in routes:
            self._answer(404, {"error": f"no {self.path}; POST /v1/score or /v1/check"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_REQUEST_BYTES:
            self._answer(413, {"error": f"request over {MAX_REQUEST_BYTES} bytes"})
            return
        try:
            body = json.loads(self.rfile.read(length))
            answer = routes[self.path](body)
        except (ValueError, TypeError, KeyError) as error:
            self._answer(400, {"error": f"bad request: {type(error).__name__}: {error}"})
            return
        except SandboxUnavailable as error:
            self._answer(503, {"error": str(error)})
            return
        self._answer(200, answer)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        sys.stderr.write(f"sandbox-server {self.address_string()} {format % args}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainyard.workloads.rewards.sandbox_server",
        description="Score code-execution jobs for trainers under a sandbox they cannot make.",
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=SANDBOX_SERVICE_PORT, help="0: a free port")
    parser.add_argument(
        "--isolation",
        choices=["strict", "rlimits"],
        default="strict",
        help="strict (needs root with CAP_SYS_ADMIN); rlimits only where the pod itself is "
        "the jail (runtimeClassName gVisor or Kata)",
    )
    parser.add_argument("--workers", type=int, default=None, help="default: the CPU count")
    args = parser.parse_args(argv)
    try:
        require_isolation(args.isolation)
    except SandboxUnavailable as error:
        print(f"sandbox server: {error}", file=sys.stderr)
        return 2
    workers = args.workers if args.workers is not None else default_workers()
    server = SandboxServer((args.host, args.port), args.isolation, workers)
    # SIGTERM (pod deletion, the local reward at exit) stops serving, then the pool.
    signal.signal(
        signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start()
    )
    print(f"listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        shutdown_pools()
    return 0


if __name__ == "__main__":
    sys.exit(main())
