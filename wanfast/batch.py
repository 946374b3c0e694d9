"""``wanfast generate --prompts-file FILE``: many requests, one model load.

FILE holds one JSON object per line (blank lines are skipped), each with ``"prompt"`` and optional
per-prompt overrides of any request field (``BATCH_FIELDS``): the line's value, else the command line's
flag, else the model's default. Every line is validated (unknown keys, wrong types, the ``SamplingParams``
rules, duplicate outputs) before any model loads; an error names the line.

The models load once and stay warm; the requests run back to back, one at a time. They are not batched
through the DiT: on an H200 a batch of two measured no throughput gain (compiled bf16 forward per sample:
2.79 vs 2.78 s at 480p, 11.30 vs 11.28 s at 720p; ../shared/anchors/h200.json, 2026-11-23), and one
request at a time keeps the peak memory, the memory mode and a failure per request.
A request that fails (e.g. out of memory) is reported and the next one runs; the exit code is then 1.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from wanfast.config import ConfigError, SamplingDefaults, SamplingParams

_STR, _INT, _NUM = (str,), (int,), (int, float)
BATCH_FIELDS: dict[str, tuple[type, ...]] = {
    "prompt": _STR, "negative_prompt": _STR, "size": _STR, "width": _INT, "height": _INT, "frames": _INT,
    "steps": _INT, "seed": _INT, "solver": _STR, "shift": _NUM, "guidance_high_noise": _NUM,
    "guidance_low_noise": _NUM, "boundary": _NUM, "cfg_steps": _INT, "step_cache_threshold": _NUM,
    "fps": _INT, "output": _STR,
}  # fmt: skip


@dataclass
class BatchItem:
    """One line of a prompts file: its 0-based index, 1-based line number, merged overrides, validated
    parameters (with the preset defaults; re-resolved with the loaded checkpoint's), output and fps."""

    index: int
    line: int
    prompt: str
    overrides: dict
    params: SamplingParams
    output: Path
    fps: int | None
    latents: Path | None = None


def _parse_line(text: str, where: str) -> dict:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(BATCH_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(BATCH_FIELDS)}")  # fmt: skip
    for key, value in entry.items():
        ok = isinstance(value, BATCH_FIELDS[key]) and not isinstance(value, bool)
        if not ok and not (value is None and key not in ("prompt", "output")):
            kind = "/".join(t.__name__ for t in BATCH_FIELDS[key])
            raise ConfigError(f"{where}: {key} must be {kind}, got {json.dumps(value)}")
    if "prompt" not in entry:
        raise ConfigError(f'{where}: missing "prompt"')
    return entry


def _overrides(entry: dict, base: dict, where: str) -> dict:
    """The command line's overrides (non-None), then the line's; ``size`` becomes width and height."""
    line = {k: v for k, v in entry.items() if k not in ("prompt", "output", "fps")}
    if "size" in line:
        if "width" in line or "height" in line:
            raise ConfigError(f"{where}: give size or width/height, not both")
        size = line.pop("size")
        try:
            line["width"], line["height"] = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise ConfigError(f"{where}: size must be WIDTHxHEIGHT, e.g. 1280x720, got {size!r}") from None
    if line.get("negative_prompt") == "":
        line["negative_prompt"] = None  # empty means the default, as official
    return {**{k: v for k, v in base.items() if v is not None}, **line}


def read_prompts_file(
    path: Path, base: dict, defaults: SamplingDefaults, output: Path, latents: Path | None = None
) -> list[BatchItem]:
    """Parse and validate every line of ``path`` (module docstring). ``base``: the command line's sampling
    overrides; ``output`` / ``latents``: the names ``<stem>_<index><suffix>`` derive from when a line has
    no ``"output"``. Raises ``ConfigError`` naming the line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read prompts file {path}: {e}") from e
    items: list[BatchItem] = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        where = f"{path}, line {number}"
        entry = _parse_line(text, where)
        overrides = _overrides(entry, base, where)
        try:
            params = SamplingParams.from_defaults(defaults, entry["prompt"], **overrides)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        i = len(items)
        out = (
            Path(entry["output"])
            if "output" in entry
            else output.with_name(f"{output.stem}_{i}{output.suffix}")
        )
        lat = latents.with_name(f"{latents.stem}_{i}{latents.suffix}") if latents is not None else None
        fps = entry.get("fps")
        if fps is not None and fps < 1:
            raise ConfigError(f"{where}: fps must be >= 1, got {fps}")
        items.append(BatchItem(i, number, entry["prompt"], overrides, params, out, fps, lat))
    if not items:
        raise ConfigError(f"prompts file {path} has no prompts (one JSON object per line)")
    seen: dict[Path, int] = {}
    for item in items:
        key = item.output.resolve()
        if key in seen:
            raise ConfigError(f"{path}, line {item.line}: output {item.output} is also line {seen[key]}'s")
        seen[key] = item.line
    return items


def forwards_text(result) -> str | None:
    """DiT forwards from ``result.forwards`` (the step cache's count), e.g. "6 computed, 2 skipped
    (high-noise 4/0, low-noise 2/2)"; None when the pipeline does not report them."""
    f = getattr(result, "forwards", None)
    if not f:
        return None
    text = f"{f.get('computed', 0)} computed, {f.get('skipped', 0)} skipped"
    experts = [k[: -len("_computed")] for k in f if k.endswith("_computed")]
    if experts:
        per = (f"{e.replace('_', '-')} {f[e + '_computed']}/{f.get(e + '_skipped', 0)}" for e in experts)
        text += f" ({', '.join(per)})"
    return text


def run_batch(
    pipe,
    items: list[BatchItem],
    default_fps: int,
    write: Callable,
    progress: Callable[[SamplingParams], Callable | None],
    rank: int = 0,
) -> int:
    """Run ``items`` back to back on the loaded ``pipe``; ``write(result, item, fps)`` saves one (rank 0);
    ``progress(params)`` returns a progress callback (or None). Prints a line per prompt and a total;
    returns 0, or 1 if any prompt failed."""
    failed, t_all = [], time.perf_counter()
    say = print if rank == 0 else (lambda *a, **k: None)
    for n, item in enumerate(items, 1):
        head = f"[{n}/{len(items)}] line {item.line}"
        try:
            params = SamplingParams.from_defaults(pipe.defaults, item.prompt, **item.overrides)
            result = pipe.run(params, progress(params))
            fps = item.fps or default_fps
            if rank == 0:
                write(result, item, fps)
        except Exception as e:  # one bad request (e.g. out of memory) must not end the others
            failed.append(item.line)
            say(f"{head}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            if pipe.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        p, t = result.params, result.timings
        text = (
            f"{head}: {item.output} ({p.width}x{p.height}, {p.frames} frames, {p.steps} steps, seed {p.seed})"
        )
        text += f" in {t.get('total', 0):.2f} s"
        forwards = forwards_text(result)
        if forwards:
            text += f"; DiT forwards {forwards}"
        if result.peak_memory_bytes is not None:
            text += f"; peak {result.peak_memory_bytes / 2**30:.2f} GiB"
        say(text)
    total = time.perf_counter() - t_all
    done = len(items) - len(failed)
    summary = f"total: {len(items)} prompts, {done} done, {len(failed)} failed, {total:.2f} s"
    summary += f" ({total / len(items):.2f} s per prompt)"
    if failed:
        summary += f"; failed lines: {', '.join(map(str, failed))}"
    say(summary)
    return 1 if failed else 0
