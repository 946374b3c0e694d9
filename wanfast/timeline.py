"""Where a fresh process spends its time before the first denoising step: ``wanfast generate --timings FILE``.

A process-wide recorder, off unless ``start()`` was called (then ``span`` and ``mark`` cost a clock read).
Times are seconds since the process started (Linux: from ``/proc/self/stat``, so the interpreter's own
start and the imports count), so spans from several threads (the text encoder loading beside the experts)
share one clock. At a span's end the thread's current CUDA stream is synchronised when CUDA is initialised,
so a span holds the device work it queued.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


def process_age() -> float:
    """Seconds since this process started, from the kernel's start time (10 ms ticks); 0.0 where /proc is
    missing."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
        start_ticks = int(after_name[19])  # field 22 of proc(5), counted from field 3
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


_ORIGIN = time.perf_counter() - process_age()  # perf_counter() value at process start


def now() -> float:
    """Seconds since the process started."""
    return time.perf_counter() - _ORIGIN


def _sync() -> None:
    """Wait for the work this thread queued on its current CUDA stream; not the device's other streams (the
    low-noise expert loads on its own stream while the steps run: neither's spans wait for the other)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()


_OPEN = threading.local()  # per thread: the fields of its open spans, innermost last (``annotate``)


class Timeline:
    """Named spans (start, end, optional bytes, fields added by ``annotate``) and marks, in seconds since
    process start."""

    def __init__(self) -> None:
        self.spans: dict[str, dict] = {}
        self.marks: dict[str, float] = {}
        self.runs: list[list[tuple[str, float]]] = []  # per pipeline run: (expert, time) at each step's end
        self._lock = threading.Lock()

    @contextmanager
    def span(self, name: str, nbytes: int | None = None) -> Iterator[None]:
        start = now()
        fields: dict = {}
        stack = _OPEN.__dict__.setdefault("stack", [])
        stack.append(fields)
        try:
            yield
        finally:
            stack.pop()
        _sync()
        end = now()
        row = {
            "start": start,
            "end": end,
            "s": end - start,
            "thread": threading.current_thread().name,
            **fields,
        }
        if nbytes is not None:
            row["bytes"] = nbytes
            row["GB_per_s"] = nbytes / 1e9 / max(end - start, 1e-9)
        with self._lock:
            self.spans[name] = row

    def mark(self, name: str, sync: bool = False) -> float:
        if sync:
            _sync()
        t = now()
        with self._lock:
            self.marks[name] = t
        return t


ACTIVE: Timeline | None = None


def start() -> Timeline:
    """Turn recording on for this process (idempotent)."""
    global ACTIVE
    if ACTIVE is None:
        ACTIVE = Timeline()
    return ACTIVE


@contextmanager
def span(name: str, nbytes: int | None = None) -> Iterator[None]:
    """A named span when recording is on; nothing otherwise."""
    if ACTIVE is None:
        yield
    else:
        with ACTIVE.span(name, nbytes):
            yield


def mark(name: str, sync: bool = False) -> None:
    if ACTIVE is not None:
        ACTIVE.mark(name, sync)


def annotate(**fields: object) -> None:
    """Add fields to this thread's innermost open span (e.g. how the loader read the weights it times);
    nothing when recording is off or no span is open."""
    stack = _OPEN.__dict__.get("stack")
    if ACTIVE is not None and stack:
        stack[-1].update(fields)


def files_bytes(*paths: os.PathLike | str | None) -> int:
    """Total size of the given files, or of every file under the given folders (None entries skipped)."""
    from pathlib import Path

    total = 0
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        if p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            total += p.stat().st_size
    return total


def timed_progress(progress_for):
    """Wrap the CLI's ``progress_for(params)``: each run starts a step list, each step's end is stamped
    after a device sync (one per step: nothing next to a step's seconds)."""

    def wrapped(params):
        inner = progress_for(params)
        tl = ACTIVE
        if tl is None:
            return inner
        tl.mark("run_start" if not tl.runs else f"run_start_{len(tl.runs)}")
        steps: list[tuple[str, float]] = []
        tl.runs.append(steps)

        def progress(i: int, n: int, expert: str) -> None:
            _sync()
            steps.append((expert, now()))
            if inner is not None:
                inner(i, n, expert)

        return progress

    return wrapped


# Dynamo's own compile-time metrics (seconds, this process): the whole compile, tracing, the backend
COMPILE_METRICS = {"compile_s": "_compile.compile_inner", "dynamo_trace_s": "bytecode_tracing",
                   "backend_compile_s": "OutputGraph.call_user_compiler"}  # fmt: skip


def compile_report() -> dict:
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    from torch._dynamo.utils import compilation_time_metrics

    from wanfast.accel.compile_cache import compile_counters

    out = {k: round(sum(compilation_time_metrics.get(v, [])), 4) for k, v in COMPILE_METRICS.items()}
    return out | compile_counters()


def report(pipeline_timings: dict | None = None, **extra: object) -> dict:
    """The recorded timeline as JSON-able data, the phases worked out. ``pipeline_timings``: the first
    run's ``GenerationResult.timings`` (text encoding, conditioning, VAE decode, total)."""
    tl = ACTIVE
    if tl is None:
        raise RuntimeError("timeline.start() was not called")
    m, pt = dict(tl.marks), dict(pipeline_timings or {})
    phases: dict[str, float] = {}
    if "imports" in m:
        phases["imports"] = m["imports"]
    if "planned" in m and "imports" in m:
        phases["plan"] = m["planned"] - m["imports"]
    for name, row in tl.spans.items():
        phases[name] = row["s"]
    if "built" in m and "planned" in m:
        phases["build"] = m["built"] - m["planned"]
    steps = tl.runs[0] if tl.runs else []
    step_s: list[float] = []
    if steps and "run_start" in m:
        denoise_start = m["run_start"] + pt.get("text_encoding", 0.0) + pt.get("conditioning", 0.0)
        edges = [denoise_start] + [t for _, t in steps]
        step_s = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
        if "text_encoding" in pt:  # else (--prompts-file) the first step's time counts from the run's start
            phases["text_encoding"] = pt["text_encoding"]
        phases["first_step"] = step_s[0]
        later = [s for (e, _), s in zip(steps[1:], step_s[1:], strict=True) if e == steps[0][0]]
        if later:  # the first step's extra over a steady step of the same expert: compile and warm-up
            phases["first_step_extra"] = step_s[0] - sorted(later)[len(later) // 2]
        m["first_step"] = steps[0][1]
        m["last_step"] = steps[-1][1]
    if "vae_decode" in pt:
        phases["vae_decode"] = pt["vae_decode"]
    if "mp4" in m and "run_end" in m:
        phases["write_mp4"] = m["mp4"] - m["run_end"]
    return {
        "clock": "seconds since process start",
        "to_first_step_s": m.get("first_step"),
        "to_mp4_s": m.get("mp4"),
        "phases": phases,
        "marks": dict(sorted(m.items(), key=lambda kv: kv[1])),
        "spans": tl.spans,
        "steps": [{"expert": e, "end": t, "s": s} for (e, t), s in zip(steps, step_s, strict=False)],
        "pipeline": pt,
        "compile": compile_report(),
        **extra,
    }


def _experts_staged(spans: dict) -> bool | None:
    """Whether every expert's weights were read by ``read_staged``, as the loader recorded it in its span
    (``read``: "staged", "mapped", or "mapped (staged failed)"); None when no expert read was recorded."""
    reads = [row.get("read") for name, row in spans.items() if name.startswith("load_expert_")]
    return all(r == "staged" for r in reads) if reads and None not in reads else None


def write_timings(path: os.PathLike | str, args, plan, result) -> dict:
    """``--timings FILE``: mark the MP4 written, then write ``report`` with the run's context."""
    import json
    from pathlib import Path

    from wanfast.loading.checkpoint import load_readers

    mark("mp4")
    out = report(
        result.timings if result is not None else None,
        argv=sys.argv,
        model=plan.spec.name,
        checkpoint=str(plan.paths.first_expert.parent) if plan.paths else None,
        settings=plan.settings.to_json(),
        params=None if result is None else {"width": result.params.width, "height": result.params.height,
                                            "frames": result.params.frames, "steps": result.params.steps},
        load_threads=os.environ.get("WANFAST_LOAD_THREADS", "1") != "0",
        overlap_load=plan.overlap_load,
        staged_load=_experts_staged(ACTIVE.spans if ACTIVE is not None else {}),
        load_readers=load_readers(),
        pid=os.getpid(),
    )  # fmt: skip
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1, default=str))
    return out
