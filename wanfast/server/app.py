"""The web process: FastAPI routes over the job store. It never loads a model; the pool's workers do.

Routes (all but ``/health`` need the API key when one is set): ``POST /v1/videos``, ``GET /v1/videos``,
``GET /v1/videos/{id}``, ``GET /v1/videos/{id}/events`` (server-sent events), ``GET /v1/videos/{id}/content``,
``DELETE /v1/videos/{id}``, ``GET /v1/loras`` (the LoRA library), ``GET /metrics``, ``GET /health``, the page at ``/`` and the docs at ``/docs``
(rendered here from the OpenAPI schema: no script, nothing from the internet).

Every request first passes ``Guard``: the ``Host`` allow-list (DNS rebinding), the API key, JSON as the
only body type, the body size limit; every response carries the security headers of ``safety``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

from wanfast.config import SamplingParams
from wanfast.server import videos
from wanfast.server.jobs import STATES, STORE_ERRORS, TERMINAL, IdempotencyConflict, JobStore, QueueFull
from wanfast.server.page import PAGE, docs_page
from wanfast.server.safety import host_allowed, redact_paths, security_headers
from wanfast.server.schemas import (
    Health,
    Limits,
    LoraList,
    VideoJob,
    VideoList,
    VideoRequest,
    WorkerHealth,
    validate_request,
)
from wanfast.server.warmup import read_warm
from wanfast.specs import ModelSpec

EVENT_POLL_SECONDS = 0.2
KEEPALIVE_SECONDS = 15.0
HEARTBEAT_STALE_SECONDS = 10.0


@dataclass
class ServerSettings:
    results_dir: Path
    spec: ModelSpec  # the served model's, for validation before a job is queued
    queue_size: int = 16
    api_key: str | None = None
    max_prompt_chars: int = 2000
    max_body_bytes: int = 64 * 1024
    limits: Limits | None = None  # None: Limits.default(spec.defaults)
    allowed_hosts: list[str] | None = None  # Host header names answered (None: any; safety.py)
    workers_alive: Callable[[], dict[str, bool]] = dict  # pool slot -> its processes run
    worker_gpus: dict[str, str] | None = None  # pool slot -> the GPUs it owns ("0", "2,3"; "" on the CPU)
    # raises ValueError (-> 422) for a request the worker's memory budget cannot hold (server/cli.py)
    fits: Callable[[SamplingParams], None] = lambda params: None
    loras: object | None = None  # the LoRA library (server/lora_library.LoraLibrary), None: no --lora-dir
    max_loras: int = 4  # most library LoRAs one request may name


def _json_error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


class Guard:
    """ASGI middleware in front of every route: the ``Host`` allow-list, the API key (except ``/health``),
    then JSON as the only body type and the body size limit. Adds ``headers`` to every response.

    Keys are accepted as ``Authorization: Bearer KEY``, ``X-API-Key: KEY`` or as the password of HTTP Basic
    authentication, which lets a browser open the page (it asks once, then sends it on every request)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, allowed_hosts: list[str] | None,
                 headers: list[tuple[bytes, bytes]]) -> None:  # fmt: skip
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes
        self.allowed_hosts, self.headers = allowed_hosts, headers

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"x-api-key", b"")
        scheme, _, value = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer":
            given = value.strip()
        elif scheme.lower() == b"basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except binascii.Error:
                return False
        return hmac.compare_digest(given, self.api_key.encode())  # bytes, constant time

    def _refusal(self, scope, headers: dict[bytes, bytes]) -> JSONResponse | None:
        host = headers.get(b"host", b"").decode("latin-1")
        if not host_allowed(host, self.allowed_hosts):
            allowed = ", ".join(self.allowed_hosts or [])
            return _json_error(400, f"this server does not answer to Host {host!r}; it answers to {allowed} "
                               "(--allowed-hosts)")  # fmt: skip
        if self.api_key and scope["path"] != "/health" and not self._authorized(headers):
            msg = "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
            challenge = {"WWW-Authenticate": 'Basic realm="wanfast", charset="UTF-8"'}
            return _json_error(401, msg, challenge)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None
        media = headers.get(b"content-type", b"").partition(b";")[0].strip().lower()
        if media != b"application/json":
            shown = media.decode("latin-1") or "none"
            return _json_error(415, f"the body must be JSON (Content-Type: application/json), not {shown}")
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_body:  # uvicorn has refused malformed ones
            return _json_error(413, f"request body larger than {self.max_body} bytes")
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        headers = dict(scope["headers"])
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await refusal(scope, receive, send_with_headers)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send_with_headers)
        # read the body here, bounded, whatever Content-Length claimed (or chunked encoding), then replay it
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body:
                too_large = _json_error(413, f"request body larger than {self.max_body} bytes")
                return await too_large(scope, receive, send_with_headers)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send_with_headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)


def _validation_errors(exc: RequestValidationError) -> list[dict]:
    """Where and what, never the input: echoed, a NaN or a lone surrogate cannot be serialised (and the
    client has it already)."""
    return [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": e["msg"], "type": e["type"]} for e in exc.errors()
    ]


def create_app(store: JobStore, settings: ServerSettings) -> FastAPI:
    app = FastAPI(
        title="wanfast",
        version="0.1.0",
        description="Wan2.2 text-to-video jobs. When the server has an API key, send it as "
        "`Authorization: Bearer KEY` or `X-API-Key: KEY` on every route but `/health`.",
        docs_url=None,
        redoc_url=None,
    )
    rejected = {"queue_full": 0, "cost_limit": 0}
    limits = settings.limits or Limits.default(settings.spec.defaults)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc), "errors": _validation_errors(exc)}, 422)

    async def store_busy(request: Request, exc: Exception) -> JSONResponse:
        # e.g. the database locked by another process for longer than --db-timeout, a full disk, or a
        # PostgreSQL server that cannot be reached
        return _json_error(503, f"the job store is unavailable ({exc}); retry later", {"Retry-After": "2"})

    for error in STORE_ERRORS:  # sqlite3.Error, and psycopg.Error where installed
        app.add_exception_handler(error, store_busy)

    def job_or_404(job_id: str):
        try:
            canonical = str(uuid.UUID(job_id))  # ids are server-made UUIDs; nothing else reaches a path
        except ValueError:
            raise HTTPException(404, f"no video job {job_id!r}") from None
        job = store.get(canonical)
        if job is None:
            raise HTTPException(404, f"no video job {job_id!r}")
        return job

    def view(job) -> VideoJob:
        return VideoJob.of(job, store.queue_position(job))

    @app.post("/v1/videos", status_code=202, response_model=VideoJob, tags=["videos"])
    def submit(
        req: VideoRequest,
        idempotency_key: str | None = Header(None, max_length=200, description="retry-safe submission"),
    ) -> VideoJob:
        """Queue a video. 202 with the job; 429 when the queue is full; 422 for invalid parameters, for a
        request over this server's cost limits (pixels x frames, steps) or one its memory budget cannot
        hold, or one naming a LoRA the library lacks (or too many, or twice, or past the strength bound).
        A repeated ``Idempotency-Key`` returns the job it first created instead of a new one (422 if
        the request differs)."""
        try:
            request, params, image = validate_request(
                req, settings.spec, settings.max_prompt_chars, settings.loras, settings.max_loras
            )
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        if image is not None:  # content-addressed: a retried submission stores no second copy
            inputs = settings.results_dir.parent / "inputs"
            inputs.mkdir(exist_ok=True)
            path = inputs / f"{hashlib.sha256(image).hexdigest()}.img"
            if not path.exists():
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_bytes(image)
                tmp.replace(path)
            # PostgreSQL: kept in the store too, for workers on other hosts (videos.local_inputs)
            videos.put_input(store, path, image)
            request["image"] = str(path)
        try:
            settings.fits(params)  # first: with a budget, its message names the memory mode that would fit
            limits.check(params)
        except ValueError as e:
            rejected["cost_limit"] += 1
            raise HTTPException(422, str(e)) from None
        try:
            job, _ = store.submit(request, settings.queue_size, idempotency_key, steps=params.steps)
        except QueueFull as e:
            rejected["queue_full"] += 1
            raise HTTPException(429, str(e), headers={"Retry-After": "5"}) from None
        except IdempotencyConflict as e:
            raise HTTPException(422, str(e)) from None
        return view(job)

    @app.get("/v1/loras", response_model=LoraList, tags=["videos"])
    def list_loras() -> LoraList:
        """The LoRA library a request's ``loras`` may name (empty without ``--lora-dir``), each checked
        against the served model when the server started."""
        return LoraList(data=settings.loras.listing() if settings.loras is not None else [])

    @app.get("/v1/videos", response_model=VideoList, tags=["videos"])
    def list_videos(
        state: str | None = Query(None, pattern="^(" + "|".join(STATES) + ")$"),
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=2**63 - 1),
    ) -> VideoList:
        """Jobs, newest first."""
        jobs, total = store.list(state, limit, offset)
        return VideoList(data=[view(j) for j in jobs], total=total)

    @app.get("/v1/videos/{job_id}", response_model=VideoJob, tags=["videos"])
    def get_video(job_id: str) -> VideoJob:
        """State, progress (step i of N, ETA), timings and error of one job."""
        return view(job_or_404(job_id))

    @app.delete("/v1/videos/{job_id}", response_model=VideoJob, tags=["videos"])
    def cancel_video(job_id: str) -> VideoJob:
        """Cancel a queued job now, or stop a running one after its current step (``cancel_requested``
        until the worker does); past its last step (VAE decode, MP4 write) the video is discarded and the
        job ends cancelled all the same. 409 for a job that has already ended."""
        job = job_or_404(job_id)
        if job.state in TERMINAL:
            raise HTTPException(409, f"job {job.id} has already ended: {job.state}")
        return view(store.cancel(job.id))

    @app.get("/v1/videos/{job_id}/content", tags=["videos"], response_class=FileResponse)
    def content(job_id: str) -> FileResponse:
        """The MP4 (H.264) of a succeeded job; 409 while it has none."""
        job = job_or_404(job_id)
        if job.state != "succeeded":
            raise HTTPException(409, f"job {job.id} is {job.state}; only a succeeded job has a video")
        return videos.response(store, job.id, settings.results_dir)  # a file, or rows of a PostgreSQL store

    @app.get("/v1/videos/{job_id}/events", tags=["videos"], response_class=StreamingResponse)
    async def events(job_id: str) -> StreamingResponse:
        """Server-sent events: a ``progress`` event with the job whenever it changes, then one ``done``
        event when it ends."""
        job = await anyio.to_thread.run_sync(job_or_404, job_id)

        async def stream() -> AsyncIterator[str]:
            last, quiet_since = None, time.monotonic()
            while True:
                current = await anyio.to_thread.run_sync(store.get, job.id)
                if current.updated_at != last:
                    last, quiet_since = current.updated_at, time.monotonic()
                    data = (await anyio.to_thread.run_sync(view, current)).model_dump_json()
                    kind = "done" if current.state in TERMINAL else "progress"
                    yield f"event: {kind}\ndata: {data}\n\n"
                    if kind == "done":
                        return
                elif time.monotonic() - quiet_since > KEEPALIVE_SECONDS:
                    quiet_since = time.monotonic()
                    yield ": keep-alive\n\n"  # a comment line: keeps proxies from closing an idle stream
                await asyncio.sleep(EVENT_POLL_SECONDS)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    def worker_health() -> Health:
        alive, gpus, now = settings.workers_alive(), settings.worker_gpus or {}, time.time()
        workers = []
        for w in store.workers():
            fresh = w["heartbeat_at"] is not None and now - w["heartbeat_at"] < HEARTBEAT_STALE_SECONDS
            state = w["state"] if alive.get(w["name"], False) or w["state"] == "failed" else "stopped"
            workers.append(WorkerHealth(
                name=w["name"], gpus=gpus.get(w["name"], ""), state=state, device=w["device"],
                up=state in ("ready", "busy") and fresh, restarts=w["restarts"],
                detail=redact_paths(w["detail"]) if state == "failed" else None,
                warm_sizes=read_warm(settings.results_dir.parent, w["name"], w["pid"]),
            ))  # fmt: skip
        up = sum(w.up for w in workers)
        if workers and up == len(workers):
            status = "ok"
        elif up:
            status = "degraded"
        else:
            status = (
                "starting" if any(w.state in ("starting", "loading", "warming") for w in workers) else "down"
            )
        return Health(status=status, workers_up=up, workers=workers)

    @app.get("/health", response_model=Health, tags=["service"])
    def health() -> JSONResponse:
        """200 while at least one worker has its model loaded (``ok``: all of them; ``degraded``: some);
        503 while none has (``starting``, or ``down``). Each worker with its state. No key needed."""
        h = worker_health()
        return JSONResponse(h.model_dump(), status_code=200 if h.workers_up else 503)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["service"])
    def metrics() -> PlainTextResponse:
        """Prometheus text format; the worker series are labelled by worker and its GPUs."""
        counts, h, rows = store.counts(), worker_health(), {w["name"]: w for w in store.workers()}
        step_sum, step_count, last_step = store.step_stats()
        lines = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value:.10g}" for labels, value in samples)

        metric("wanfast_queue_depth", "gauge", "Jobs waiting in the queue.", [("", counts["queued"])])
        metric("wanfast_queue_capacity", "gauge", "Most jobs the queue holds.", [("", settings.queue_size)])
        metric("wanfast_jobs", "gauge", "Jobs by state.", [(f'{{state="{s}"}}', counts[s]) for s in STATES])
        metric("wanfast_rejected_total", "counter", "Submissions refused since start, by reason.",
               [(f'{{reason="{r}"}}', n) for r, n in rejected.items()])  # fmt: skip
        metric("wanfast_step_seconds", "summary", "Denoising step time of ended jobs.",
               [("_sum", step_sum), ("_count", step_count)])  # fmt: skip
        metric(
            "wanfast_last_step_seconds", "gauge", "Mean step time of the latest job.", [("", last_step or 0)]
        )
        metric("wanfast_workers", "gauge", "Workers of the pool.", [("", len(h.workers))])
        label = {w.name: f'{{worker="{w.name}",gpus="{w.gpus}"}}' for w in h.workers}
        metric("wanfast_worker_up", "gauge", "1 when the worker has its model loaded and beats.",
               [(label[w.name], w.up) for w in h.workers])  # fmt: skip
        metric("wanfast_worker_busy", "gauge", "1 while the worker runs a job.",
               [(label[w.name], w.state == "busy") for w in h.workers])  # fmt: skip
        metric("wanfast_worker_restarts_total", "counter", "Worker processes that died or hung and were replaced.",
               [(label[w.name], w.restarts) for w in h.workers])  # fmt: skip
        for key, help_ in (("allocated", "held by tensors"), ("reserved", "held by the caching allocator"),
                           ("total", "of the device")):  # fmt: skip
            samples = [(label[w.name], rows[w.name][f"memory_{key}"] or 0) for w in h.workers]  # 0 on a CPU
            metric(f"wanfast_gpu_memory_{key}_bytes", "gauge", f"GPU memory {help_}.", samples)
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    page_html = PAGE.replace("__DEFAULTS__", json.dumps(_page_defaults(settings.spec.defaults)))
    docs_html = docs_page(app.openapi())

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(page_html)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(docs_html)

    app.add_middleware(
        Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
        allowed_hosts=settings.allowed_hosts, headers=security_headers(page_html, docs_html),
    )  # fmt: skip
    return app


def _page_defaults(d) -> dict:
    return {"size": f"{d.size[0]}x{d.size[1]}", "frames": d.frames, "steps": d.steps}
