"""``wanfast generate --prompts-file FILE``: many requests, one model load.

FILE holds one JSON object per line (lines end at "\n" only: a JSON string may hold U+2028 and other
Unicode line separators; blank lines are skipped), each with ``"prompt"`` and optional per-prompt overrides
of any request field (``BATCH_FIELDS``, ``"image"`` a path for models that take one): the line's value,
else the command line's flag, else the model's default. Every line is validated (unknown keys, wrong
types, the model's rules, readable images, duplicate outputs) before any model loads; every bad line is
reported, each by its number.

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

from wanfast.config import ConfigError, SamplingParams

_STR, _INT, _NUM = (str,), (int,), (int, float)
BATCH_FIELDS: dict[str, tuple[type, ...]] = {
    "prompt": _STR, "negative_prompt": _STR, "size": _STR, "width": _INT, "height": _INT, "frames": _INT,
    "steps": _INT, "seed": _INT, "solver": _STR, "shift": _NUM, "guidance_high_noise": _NUM,
    "guidance_low_noise": _NUM, "boundary": _NUM, "cfg_steps": _INT, "step_cache_threshold": _NUM,
    "fps": _INT, "output": _STR, "guidance": _NUM, "image": _STR,
}  # fmt: skip


@dataclass
class BatchItem:
    """One line of a prompts file: its 0-based index, 1-based line number, merged overrides, validated
    parameters (the model's defaults, then the flags, then the line), output, fps and image path."""

    index: int
    line: int
    prompt: str
    overrides: dict
    params: SamplingParams
    output: Path
    fps: int | None
    latents: Path | None = None
    image: Path | None = None


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


def _overrides(entry: dict, base: dict) -> dict:
    """The command line's overrides (non-None), then the line's."""
    line = {k: v for k, v in entry.items() if k not in ("prompt", "output", "fps", "image")}
    if "width" in line or "height" in line:
        base = {k: v for k, v in base.items() if k != "size"}  # the line's width/height replace --size
    return {**{k: v for k, v in base.items() if v is not None}, **line}


def _read_item(path: Path, number: int, text: str, base: dict, spec, image: Path | None, i: int,
               output: Path, latents: Path | None) -> BatchItem:  # fmt: skip
    from wanfast.specs import resolve_params

    where = f"{path}, line {number}"
    entry = _parse_line(text, where)
    overrides = _overrides(entry, base)
    fps = entry.get("fps")
    if fps is not None and fps < 1:
        raise ConfigError(f"{where}: fps must be >= 1, got {fps}")
    img_path = Path(entry["image"]) if entry.get("image") is not None else image
    try:
        size = None
        if img_path is not None:
            from wanfast.image import load_image

            size = load_image(img_path).size
        params = resolve_params(spec, entry["prompt"], image_size=size, **overrides)
    except (ConfigError, FileNotFoundError) as e:
        raise ConfigError(f"{where}: {e}") from None
    out = (
        Path(entry["output"]) if "output" in entry else output.with_name(f"{output.stem}_{i}{output.suffix}")
    )
    lat = latents.with_name(f"{latents.stem}_{i}{latents.suffix}") if latents is not None else None
    return BatchItem(i, number, entry["prompt"], overrides, params, out, fps, lat, img_path)


def read_prompts_file(
    path: Path, base: dict, spec, output: Path, latents: Path | None = None, image: Path | None = None
) -> list[BatchItem]:
    """Parse and validate every line of ``path`` (module docstring) for the model ``spec``. ``base``: the
    command line's sampling overrides; ``output`` / ``latents``: the names ``<stem>_<index><suffix>``
    derive from when a line has no ``"output"``; ``image``: the --image a line without one uses. Raises
    ``ConfigError`` naming every bad line."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): U+2028 is JSON text
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read prompts file {path}: {e}") from e
    items: list[BatchItem] = []
    errors: list[str] = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            items.append(
                _read_item(path, number, text.rstrip("\r"), base, spec, image, len(items), output, latents)
            )
        except ConfigError as e:
            errors.append(str(e))
    if errors:
        more = f" ({len(errors)} bad lines)" if len(errors) > 1 else ""
        raise ConfigError("\n".join(errors) + more)
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
    on_stage: Callable[[str], None] | None = None,
    open_writer: Callable | None = None,
) -> int:
    """Run ``items`` back to back on the loaded ``pipe``; ``write(result, item, fps, writer)`` saves one
    (rank 0; ``writer`` None unless ``open_writer`` gave one);
    ``progress(params)`` returns a progress callback (or None). ``open_writer(item, fps)``: a
    ``video.Mp4Writer`` opened before the item's run and fed during its decode; it is then handed to
    ``write(result, item, fps, writer)`` to close (aborted if the run fails). Prints a line per prompt
    and a total; returns 0, or 1 if any prompt failed."""
    failed, t_all = [], time.perf_counter()
    say = print if rank == 0 else (lambda *a, **k: None)
    for n, item in enumerate(items, 1):
        head = f"[{n}/{len(items)}] line {item.line}"
        writer = None
        try:
            image = None
            if item.image is not None:
                from wanfast.image import load_image

                image = load_image(item.image)
            fps = item.fps or default_fps
            writer = open_writer(item, fps) if open_writer is not None and rank == 0 else None
            sink = writer.add if writer is not None else None
            result = pipe.run(item.params, progress(item.params), image=image, on_stage=on_stage,
                              frames_sink=sink)  # fmt: skip
            if rank == 0:
                write(result, item, fps, writer)
        except Exception as e:  # one bad request (e.g. out of memory) must not end the others
            if writer is not None:
                writer.abort()  # its partial file deleted; a no-op once written
            failed.append(item.line)
            say(f"{head}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            if pipe.device.type == "cuda":
                import torch

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
