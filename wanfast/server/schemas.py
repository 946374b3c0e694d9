"""Request and response models of the HTTP API.

Three layers of validation: pydantic checks types strictly (a JSON integer for an integer field, never
``true``, ``"9"`` or ``1e3``; finite numbers only; ASCII digits in a size; text that UTF-8 can encode) and
coarse ranges; ``specs.resolve_params`` applies the model's rules (size multiple, frames per VAE stride,
image or not), the same code the CLI and ``WanPipeline.params`` use; then ``Limits`` caps what one request
may cost on this server (pixels x frames, steps; and with a memory budget, what the budget holds). An image
comes base64-encoded and is checked by ``wanfast.image.load_image`` at the door.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from wanfast.config import SOLVERS, ConfigError, SamplingParams
from wanfast.server.jobs import Job
from wanfast.server.safety import lone_surrogate, redact_paths, utf8_safe
from wanfast.specs import ModelSpec, SamplingDefaults, parse_size, resolve_params

MAX_SIDE = 4096  # pixels per side: a larger request cannot fit a GPU, refuse it before it queues
LIMIT_FACTOR = 2.5  # default cost limits: this many times the model's default request


class LoraRef(BaseModel):
    """One LoRA of the server's library (``GET /v1/loras``) and its strength on each expert."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=100, description="a name from GET /v1/loras")
    high_noise: float | None = Field(None, description="strength on the high-noise expert (default 1)")
    low_noise: float | None = Field(None, description="strength on the low-noise expert (default high_noise)")


class VideoRequest(BaseModel):
    """Sampling parameters, named as the ``wanfast generate`` options. Omitted ones take the model's
    defaults (for a checkpoint, its own expert boundary). The fields cap only what one request may cost;
    every other rule is the shared one (``specs.resolve_params``), so the CLI and the server refuse a bad
    value with the same words."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field(min_length=1, description="the text prompt")
    negative_prompt: str | None = Field(None, description="default: the official negative prompt")
    size: str | None = Field(
        None, pattern=r"^[0-9]{1,5}x[0-9]{1,5}$", description="WIDTHxHEIGHT", examples=["1280x720"]
    )
    frames: int | None = Field(None, le=1001, description="frame count, 4n+1")
    steps: int | None = Field(None, le=1000, description="sampling steps")
    seed: int = Field(0, description="in [0, 2**63)")
    solver: Literal[SOLVERS] | None = None  # type: ignore[valid-type]
    shift: float | None = Field(None, le=1000)
    image: str | None = Field(
        None, description="the first frame (TI2V / I2V models): a PNG/JPEG/WebP file, base64-encoded"
    )
    guidance: float | None = Field(None, le=100, description="CFG scale of every expert")
    guidance_high_noise: float | None = Field(None, le=100)
    guidance_low_noise: float | None = Field(None, le=100)
    boundary: float | None = Field(None, description="expert switch, fraction of 1000")
    cfg_steps: int | None = Field(
        None, le=1000, description="lossy: guidance for the first K steps only (default: every step)"
    )
    step_cache_threshold: float | None = Field(
        None, le=10, description="lossy: skip DiT forwards below this input change (0: off)"
    )
    fps: int | None = Field(None, ge=1, le=120, description="frame rate of the MP4")
    loras: list[LoraRef] | None = Field(
        None, max_length=64, description="LoRAs of the server's library, merged in this order"
    )

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _encodable(cls, text: str | None) -> str | None:
        bad = lone_surrogate(text) if text is not None else None
        if bad:  # stored, it would break every response that shows it
            raise ValueError(
                f"contains a lone UTF-16 surrogate ({bad}), which is not text; send valid Unicode"
            )
        return text


@dataclass(frozen=True)
class Limits:
    """What one request may cost on this server: ``max_pixel_frames`` (width x height x frames: memory and
    attention time grow with it) and ``max_steps`` (time)."""

    max_pixel_frames: int
    max_steps: int

    @classmethod
    def default(cls, d: SamplingDefaults) -> Limits:
        """``LIMIT_FACTOR`` times the model's default request (1280x720 x 81 frames, 40 steps for A14B:
        186,624,000 pixel-frames, e.g. 1920x1088 x 81, and 100 steps)."""
        return cls(int(LIMIT_FACTOR * d.size[0] * d.size[1] * d.frames), int(LIMIT_FACTOR * d.steps))

    def check(self, p: SamplingParams) -> None:
        """Raises ValueError naming the limit that ``p`` passes."""
        cost = p.width * p.height * p.frames
        if cost > self.max_pixel_frames:
            raise ValueError(
                f"{p.width}x{p.height} x {p.frames} frames is {cost:,} pixel-frames; this server accepts at "
                f"most {self.max_pixel_frames:,} per request (--max-pixel-frames)"
            )
        if p.steps > self.max_steps:
            raise ValueError(f"steps {p.steps}: this server accepts at most {self.max_steps} (--max-steps)")


def decode_image(data: str):
    """The request's base64 image -> (its bytes, a checked ``PIL.Image``). Raises ``ConfigError``."""
    from wanfast.image import load_image

    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("image must be a base64-encoded image file") from None
    return raw, load_image(raw)


def validate_request(
    req: VideoRequest, spec: ModelSpec, max_prompt_chars: int, library=None, max_loras: int = 4
) -> tuple[dict, SamplingParams, bytes | None]:
    """The job's stored request (only what the client set; the image left out; ``loras`` in the
    canonical form of ``library``, a ``lora_library.LoraLibrary`` or None), the parameters it gives for
    the model ``spec``, and the image file's bytes (None without one). Raises ValueError (ConfigError)
    with a message for the client."""
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name)
        if text is not None and len(text) > max_prompt_chars:
            raise ValueError(
                f"{name} has {len(text)} characters; this server accepts at most {max_prompt_chars}"
            )
    stored = req.model_dump(exclude_none=True)
    loras = stored.pop("loras", None)
    if loras:
        if library is None:
            raise ValueError("loras: this server has no LoRA library (wanfast serve --lora-dir)")
        stored["loras"] = library.canonical(loras, spec.two_experts, max_loras)
    raw, image = None, None
    if stored.pop("image", None) is not None:
        raw, image = decode_image(req.image)
    if req.size is not None:
        w, h = parse_size(req.size)
        if max(w, h) > MAX_SIDE:
            raise ValueError(f"size {req.size} is too large; at most {MAX_SIDE} pixels per side")
        stored["size"] = [w, h]
    overrides = {k: v for k, v in stored.items() if k not in ("prompt", "fps", "loras")}
    size = image.size if image is not None else None
    return stored, resolve_params(spec, req.prompt, image_size=size, **overrides), raw  # the shared rules


class Progress(BaseModel):
    step: int = Field(description="denoising steps done")
    steps: int | None = Field(description="denoising steps in all (known once the job starts)")
    fraction: float
    expert: str | None = Field(description="the expert of the latest step: high_noise or low_noise")
    step_seconds: float | None = Field(description="mean seconds per step so far")
    eta_seconds: float | None = Field(description="remaining denoising time (VAE decode not included)")
    stage: str | None = Field(
        description="of a running job: starting, text_encoding, denoising, decoding (the VAE), writing"
    )


class VideoJob(BaseModel):
    id: str
    object: Literal["video"] = "video"
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: float = Field(description="Unix time")
    started_at: float | None
    finished_at: float | None
    queue_position: int | None = Field(description="0: next to run; null unless queued")
    progress: Progress
    request: dict = Field(description="the parameters as submitted")
    params: dict | None = Field(description="the parameters the worker ran, defaults filled in")
    timings: dict | None = Field(description="seconds per stage")
    peak_memory_bytes: int | None
    attempts: int = Field(description="times a worker started this job (restarts re-queue it)")
    cancel_requested: bool
    error: str | None
    note: str | None = Field(description="what a restart did to this job, if anything")
    worker: str | None = Field(description="the pool worker that ran it (last), e.g. w0")
    content_url: str | None

    @classmethod
    def of(cls, job: Job, queue_position: int | None = None) -> VideoJob:
        done = job.step if job.state != "succeeded" else (job.steps or job.step)
        return cls(
            **{k: getattr(job, k) for k in ("id", "state", "created_at", "started_at", "finished_at", "timings",
                                            "peak_memory_bytes", "attempts", "cancel_requested", "note", "worker")},
            # text a client sent (a job stored by an earlier version may hold what UTF-8 cannot encode)
            request=utf8_safe(_public(job.request)), params=utf8_safe(job.params), error=redact_paths(job.error),
            queue_position=queue_position,
            progress=Progress(
                step=done, steps=job.steps, fraction=done / job.steps if job.steps else 0.0, expert=job.expert,
                step_seconds=job.step_seconds, eta_seconds=job.eta_seconds,
                stage=job.stage if job.state == "running" else None,
            ),
            content_url=f"/v1/videos/{job.id}/content" if job.state == "succeeded" else None,
        )  # fmt: skip


def _public(request: dict) -> dict:
    """The request as the client may see it: a stored image is named by its content hash, not by its path
    on this server."""
    if "image" not in request:
        return request
    return {**request, "image": "sha256:" + request["image"].rsplit("/", 1)[-1].removesuffix(".img")}


class LoraInfo(BaseModel):
    name: str = Field(description="what a request's loras[].name says")
    file: str
    size_bytes: int
    rank: int | None = Field(description="largest rank of its low-rank pairs; null: full deltas only")
    targets: int = Field(description="parameters it changes")
    full_deltas: bool = Field(description="holds full deltas (.diff / .diff_b / .diff_m) besides pairs")
    models: list[str] = Field(
        description="the served model (every file is checked against it at server start) and the "
        "published Wan2.2 models every target of the file fits"
    )


class LoraList(BaseModel):
    data: list[LoraInfo]


class VideoList(BaseModel):
    data: list[VideoJob]
    total: int = Field(description="jobs matching the filter, all pages")


class WorkerHealth(BaseModel):
    name: str = Field(description="w0, w1, ...")
    gpus: str = Field(description="the CUDA devices it owns, e.g. 0 or 2,3; empty on the CPU")
    state: str = Field(
        description="starting, loading, warming (--warm-sizes), ready, busy, failed or stopped"
    )
    up: bool = Field(description="ready or busy, with a recent heartbeat")
    device: str | None
    restarts: int
    detail: str | None = Field(None, description="why it failed")
    warm_sizes: list[str] = Field(
        [], description="WxHxF sizes this worker has run since it started (--warm-sizes)"
    )


class Health(BaseModel):
    status: Literal["ok", "degraded", "starting", "down"] = Field(
        description="ok: every worker is up; degraded: some are (200); starting: none yet; down: none (503)"
    )
    workers_up: int
    workers: list[WorkerHealth]
