"""``wanfast serve``: the HTTP service (web process + one worker process)."""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from wanfast.cli import add_engine_memory_flags, add_model_source
from wanfast.config import PRESETS, ConfigError, SamplingParams

log = logging.getLogger("wanfast.server")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the HTTP service (see docs/server.md)")
    p.set_defaults(func=serve_main)
    add_model_source(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", type=Path, default=Path("wanfast-data"), help="job database and videos")
    p.add_argument(
        "--api-key",
        default=None,
        help="require this key on every route but /health (default: $WANFAST_API_KEY)",
    )
    p.add_argument("--queue-size", type=int, default=16, help="most jobs waiting; more get 429 (default 16)")
    p.add_argument(
        "--max-prompt-chars", type=int, default=2000, help="longest prompt accepted (default 2000)"
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=64 * 1024, help="largest request body (default 64 KiB)"
    )
    p.add_argument("--device", default=None, help="worker device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="DiT/text-encoder dtype: bf16 (default on GPU), fp16, fp32")
    p.add_argument("--attention", default="auto", help="attention backend (default: fastest available)")
    add_engine_memory_flags(
        p
    )  # --text-encoder-device/--t5-cpu, --self-attention, --quant, --compile-mode, --offload, --memory-budget
    p.add_argument("--no-compile", action="store_true", help="no regional torch.compile of the DiT blocks")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _lock(data_dir: Path):
    """One server per data directory: a second one would run every job twice. The kernel drops the lock
    when this process dies, however it dies."""
    handle = open(data_dir / "server.lock", "a+")  # held for the life of the process
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"another wanfast server is using {data_dir}") from None
    return handle


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def worker_config(args: argparse.Namespace, data_dir: Path) -> dict:
    """What the worker process gets (JSON): the model source and its engine switches."""
    return {
        "data_dir": str(data_dir), "model": args.model, "ckpt_dir": str(args.ckpt_dir) if args.ckpt_dir else None,
        "device": args.device, "dtype": args.dtype, "text_encoder_device": args.text_encoder_device,
        "attention": args.attention, "self_attention": args.self_attention, "quant": args.quant,
        "offload": args.offload, "memory_budget_gb": args.memory_budget, "compile": False if args.no_compile else None,
        "compile_mode": args.compile_mode, "fp8_row_kernels": not args.no_fp8_row_kernels,
    }  # fmt: skip


def check_memory(config: dict) -> tuple[str | None, Callable[[SamplingParams], None]]:
    """With a memory budget, the mode the worker will pick for the model's default request (raises
    ``MemoryBudgetError`` now rather than in a worker restart loop): (the reason, or None; a check that
    rejects a request too large for that mode and budget before it is queued)."""
    if config["memory_budget_gb"] is None:
        return None, lambda params: None
    from wanfast.api import check_request_fits, model_preset, plan_memory
    from wanfast.loading.layout import detect_layout
    from wanfast.server.worker import worker_settings

    preset, fp8 = model_preset(detect_layout(config["ckpt_dir"]) if config["ckpt_dir"] else None)
    d = preset.defaults
    planned, why = plan_memory(worker_settings(config), preset, [(*d.size, d.frames)], fp8)

    def fits(params: SamplingParams) -> None:
        check_request_fits(planned, preset, params.width, params.height, params.frames)

    return why, fits


def _exit_cleanly(signum: int, frame) -> None:
    raise SystemExit(0)


def serve_main(args: argparse.Namespace) -> int:
    import uvicorn

    from wanfast.server.app import ServerSettings, create_app
    from wanfast.server.jobs import JobStore
    from wanfast.server.worker import WorkerSupervisor

    if args.queue_size < 1 or args.max_prompt_chars < 1 or args.max_body_bytes < 1024:
        raise ConfigError("--queue-size and --max-prompt-chars must be >= 1, --max-body-bytes >= 1024")
    if args.ckpt_dir is not None:
        from wanfast.loading.layout import detect_layout

        detect_layout(args.ckpt_dir)  # a wrong folder fails here, not in a worker restart loop
    api_key = args.api_key or os.environ.get("WANFAST_API_KEY") or None
    if not _is_loopback(args.host) and api_key is None:
        print(f"wanfast: warning: serving on {args.host} without an API key", file=sys.stderr)
    logging.getLogger("wanfast").setLevel(logging.INFO)

    data_dir = args.data_dir.resolve()
    results = data_dir / "results"
    results.mkdir(parents=True, exist_ok=True)
    lock = _lock(data_dir)
    store = JobStore(data_dir / "jobs.db")
    store.register_worker(None)
    changed = store.recover(results, "server restarted")  # the restart rule, before any worker runs
    for state in ("queued", "failed", "cancelled"):
        ids = [i for i, s in changed.items() if s == state]
        if ids:
            log.warning("interrupted jobs now %s: %s", state, ", ".join(ids))

    config = worker_config(args, data_dir)
    why, fits = check_memory(config)
    if why:
        log.info("%s", why)
    supervisor = WorkerSupervisor(store, config, results)
    preset = PRESETS["tiny" if args.model == "tiny" else "t2v-A14B"]
    settings = ServerSettings(
        results_dir=results, defaults=preset.defaults, queue_size=args.queue_size, api_key=api_key,
        max_prompt_chars=args.max_prompt_chars, max_body_bytes=args.max_body_bytes, worker_alive=supervisor.alive,
        fits=fits,
    )  # fmt: skip
    # uvicorn shuts down on SIGINT/SIGTERM, then raises the signal again: let that end in `finally` below,
    # which stops the worker and re-queues its job, rather than in the default handler's abrupt exit
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_cleanly)
    supervisor.start()
    try:
        # bounded graceful shutdown: an open event stream would otherwise hold the server until its job ends
        uvicorn.run(
            create_app(store, settings), host=args.host, port=args.port, log_level=args.log_level,
            timeout_graceful_shutdown=5,
        )  # fmt: skip
    finally:
        supervisor.stop()
        lock.close()
    return 0
