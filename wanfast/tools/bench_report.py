"""The report side of ``wanfast bench``: the composed estimate, the ratio columns, the terminal table and
the PNG bar chart, all computed from the measurement records that ``wanfast.tools.bench`` collects."""

from __future__ import annotations

import itertools
import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from wanfast.config import EngineSettings
    from wanfast.tools.bench import Engine


WHATS = ("forward", "step", "text", "vae", "generate")  # what `--what` can time, in table order
COMPOSED = "text_encoding + {n} x median step + vae_decode, each term measured in this run"


def _vae_row(settings: EngineSettings) -> str:
    """The VAE row of a wanfast engine: ``optimize_vae`` is the one switch that changes the VAE."""
    return "wanfast" if settings.optimize_vae else "wanfast-plain-vae"


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def compose(records: list[dict], engines: list[Engine], sizes: list[str], steps: int) -> list[dict]:
    """The composed ``steps``-step estimate per engine and size from terms measured in this run: the
    standalone text / step / vae measurements where present, else the stages of that engine's generation.
    Where a generation was measured, the same formula at its step count stands beside its measured time."""

    def find(engine: str, what: str, size: str | None) -> dict | None:
        keys = (engine, what, size, "measured")
        return next((r for r in records if (r["engine"], r["what"], r["size"], r["kind"]) == keys), None)

    out = []
    for e in engines:
        for size in sizes:
            vae_row = _vae_row(e.settings) if e.settings else e.name
            gen, step = find(e.name, "generate", size), find(e.name, "step", size)
            text, vae = find(e.impl, "text", None), find(vae_row, "vae", size)
            terms = {
                "text_encoding": _term(
                    (text, _seconds, "text"), (gen, _gen_stage("text_encoding"), "generate")
                ),
                "step": _term((step, _seconds, "step"), (gen, _gen_median_step, "generate: median step")),
                "vae_decode": _term((vae, _seconds, "vae"), (gen, _gen_stage("vae_decode"), "generate")),
            }
            if None in terms.values():
                continue
            (t, _), (s, _), (v, _) = terms["text_encoding"], terms["step"], terms["vae_decode"]
            rec = {"engine": e.name, "impl": e.impl, "what": "generate", "size": size, "kind": "composed",
                   "steps": steps, "seconds": t + steps * s + v, "peak_memory_bytes": None,
                   "formula": COMPOSED.format(n=steps),
                   "terms": {k: {"seconds": val, "from": src} for k, (val, src) in terms.items()}}  # fmt: skip
            if gen:  # how well the formula predicts a run that was measured
                rec["at_measured_steps"] = {"steps": gen["steps"], "composed_s": t + gen["steps"] * s + v,
                                            "measured_s": gen["seconds"]}  # fmt: skip
            out.append(rec)
    return out


def _term(*options: tuple[dict | None, Callable[[dict], float], str]) -> tuple[float, str] | None:
    """(value, source) from the first option whose record exists."""
    return next(((get(rec), src) for rec, get, src in options if rec is not None), None)


def _seconds(rec: dict) -> float:
    return rec["seconds"]


def _gen_stage(stage: str) -> Callable[[dict], float]:
    return lambda rec: rec["stages_s"][stage]


def _gen_median_step(rec: dict) -> float:
    return statistics.median(rec["step_times_s"])


def annotate_ratios(records: list[dict], first: str) -> None:
    """``vs_diffusers``: time (and ``memory_vs_diffusers``: peak memory) over the Diffusers row of the same
    what, size, kind and step count; ``vs_first``: time over the first --compare engine's. < 1 is better."""

    def key(r: dict) -> tuple:
        return r["what"], r["size"], r["kind"], r.get("steps")

    peer = {key(r): r for r in records if r["impl"] == "diffusers"}
    base = {key(r): r for r in records if r["engine"] == first}
    for r in (r for r in records if r["impl"] == "wanfast"):
        if (p := peer.get(key(r))) is not None:
            r["vs_diffusers"] = r["seconds"] / p["seconds"]
            if r["peak_memory_bytes"] and p["peak_memory_bytes"]:
                r["memory_vs_diffusers"] = r["peak_memory_bytes"] / p["peak_memory_bytes"]
        if (b := base.get(key(r))) is not None:
            r["vs_first"] = r["seconds"] / b["seconds"]


def _label(r: dict) -> str:
    if r["what"] != "generate":
        return r["what"]
    return f"generate {r['steps']} steps" + (" (composed)" if r["kind"] == "composed" else "")


def _order(r: dict) -> tuple:
    return WHATS.index(r["what"]), r["kind"] == "composed", r["size"] or "", r["impl"] != "wanfast"


def format_table(report: dict) -> str:
    env, cfg = report["environment"], report["config"]
    first = (cfg["compare"] or ["diffusers"])[0]
    head = ("what", "size", "engine", "kind", "seconds", "peak GiB", "vs diffusers", f"vs {first}")
    order = sorted(report["measurements"], key=_order)
    rows = [head] + [
        (_label(r), r["size"] or "-", r["engine"], r["kind"], f"{r['seconds']:.3f}", _gib(r["peak_memory_bytes"]),
         f"{r['vs_diffusers']:.3f}x" if "vs_diffusers" in r else "-",
         f"{r['vs_first']:.3f}x" if "vs_first" in r else "-")
        for r in order
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        f"wanfast bench: {cfg['model']} on {env['device_name']} (torch {env['torch']}), {cfg['frames']} frames, "
        f"{cfg['dtype']}, VAE {cfg['vae_dtype']}, attention {env['attention_backend']}"
    ]
    just = [str.ljust] * 4 + [str.rjust] * 4  # names left, numbers right
    lines += ["  ".join(f(c, w) for f, c, w in zip(just, row, widths, strict=True)) for row in rows]
    if any(r["kind"] == "composed" for r in report["measurements"]):
        lines.append(f"composed = {COMPOSED.format(n=cfg['composed_steps'])}")
    for c in report["checks"]:
        verdict = "ok" if c["ok"] else f"EXCEEDS {c['tolerance']:g}"
        lines.append(f"check {c['engine']} vs {c['reference']} at {c['size']}, {c['steps']} steps: relative "
                     f"error of the final latents {c['relative_error']:.3e} ({verdict})")  # fmt: skip
    return "\n".join(lines)


def write_png(report: dict, path: Path) -> str | None:
    """A bar chart, one panel per (what, size); returns None, or why no PNG was written."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend state; savefig renders with Agg
    except ImportError as e:
        return f"matplotlib is not importable ({e}); pip install matplotlib to get the PNG"
    records = sorted(report["measurements"], key=_order)
    labels = list(dict.fromkeys(_label(r) for r in records))  # one row of panels each
    sizes = list(dict.fromkeys(r["size"] for r in records if r["size"])) or [None]  # one column each
    fig = Figure(figsize=(1.5 + 3.2 * len(sizes), 0.6 + 2.6 * len(labels)), layout="constrained")
    axes = fig.subplots(len(labels), len(sizes), squeeze=False)
    panels: dict[tuple[int, int], list[dict]] = {}
    for r in records:  # size-independent rows (text) go to the first column
        panels.setdefault((labels.index(_label(r)), sizes.index(r["size"]) if r["size"] else 0), []).append(r)
    for i, j in itertools.product(range(len(labels)), range(len(sizes))):
        ax, rows = axes[i][j], panels.get((i, j))
        if not rows:
            ax.set_axis_off()
            continue
        colors = ["tab:gray" if r["impl"] == "diffusers" else "tab:blue" for r in rows]
        bars = ax.bar(range(len(rows)), [r["seconds"] for r in rows], color=colors)
        for bar, r in zip(bars, rows, strict=True):
            bar.set_hatch("//" if r["kind"] == "composed" else "")
        ratio = [f"\n{r['vs_diffusers']:.2f}x" if "vs_diffusers" in r else "" for r in rows]
        ax.bar_label(bars, [f"{r['seconds']:.3g} s{x}" for r, x in zip(rows, ratio, strict=True)], fontsize=7)
        ax.set_xticks(range(len(rows)), [r["engine"] for r in rows], rotation=20, fontsize=8)
        ax.set_title(f"{labels[i]}, {rows[0]['size'] or 'any size'}", fontsize=9)
        ax.set_ylabel("seconds", fontsize=8)
        ax.margins(y=0.25)
    env = report["environment"]
    fig.suptitle(f"wanfast bench, {report['config']['model']} on {env['device_name']}\nseconds (lower is better), "
                 "time / Diffusers under each bar; hatched: composed estimate", fontsize=10)  # fmt: skip
    fig.savefig(path, dpi=120)
    return None


def engine_json(side, engine: Engine) -> dict:
    """An engine of the report: its name, implementation and settings (JSON-ready)."""
    if engine.settings is None:
        return {"name": engine.name, "impl": engine.impl, "settings": side.settings()}
    settings = {k: str(v) if isinstance(v, torch.dtype) else v for k, v in asdict(engine.settings).items()}
    return {"name": engine.name, "impl": engine.impl, "settings": settings}


def environment(device: torch.device) -> dict:
    """Where the numbers come from: device, library versions, the commit (``WANFAST_COMMIT`` or git)."""
    import transformers

    from wanfast.tools.bench_peer import version

    commit = os.environ.get("WANFAST_COMMIT")  # a copy of the tree may carry a stale .git, or none
    if not commit:
        try:
            git = ["git", "rev-parse", "--short", "HEAD"]
            run = subprocess.run(git, capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10)
            commit = run.stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "diffusers": version(),
            "python": platform.python_version(), "commit": commit}  # fmt: skip
