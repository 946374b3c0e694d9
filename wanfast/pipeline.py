"""The Wan2.2 pipeline of every model: text encoding, conditioning, denoising with CFG, VAE decode.

Follows the official ``generate`` of each model step for step: noise from ``torch.Generator(device)``
seeded with ``seed``; a two-expert model runs the high-noise expert while ``t >= boundary * 1000`` and the
low-noise one after, each with its own guidance scale; the model's conditioning (``wanfast.conditioning``:
nothing, the image as the first latent frame, or image channels) enters the DiT input, its timesteps and
the latents after each solver step; VAE decode of the final latents.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from wanfast.accel import reset_caches
from wanfast.accel.stepcache import ForwardCounter, StepCache, installed
from wanfast.conditioning import CONDITIONINGS, Condition
from wanfast.config import EngineSettings, SamplingParams
from wanfast.experts import Experts
from wanfast.solvers import make_solver
from wanfast.specs import ModelSpec, expert_for, resolve_params
from wanfast.video import to_uint8_frames

ProgressFn = Callable[[int, int, str], None]  # (step index, total steps, expert name)


@dataclass
class GenerationResult:
    frames: torch.Tensor  # uint8 [F, H, W, 3], on the CPU
    latents: torch.Tensor  # float32 [C, F', H/s, W/s] (C, s: the VAE's latent channels and stride), CPU
    params: SamplingParams
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    steps_per_expert: dict[str, int] = field(default_factory=dict)
    # DiT forwards this process ran and skipped (step caching): "computed", "skipped", and per expert
    # "<expert>_computed" / "<expert>_skipped"; two per guided step, one per unguided or CFG-parallel step
    forwards: dict[str, int] = field(default_factory=dict)
    peak_memory_bytes: int | None = None


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """The official combination: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def guided_prediction(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, context, context_null, scale: float
) -> torch.Tensor:
    """One step's guided prediction of x [1, C, F', H', W']; a scale of 1.0 runs the conditional pass alone.
    ``wanfast.parallel`` replaces it by the CFG-parallel version (``ParallelRuntime.predict``)."""
    pred = model(x, t, context)
    return pred if scale == 1.0 else classifier_free_guidance(pred, model(x, t, context_null), scale)


def denoise(
    experts: dict[str, nn.Module],
    noise: torch.Tensor,
    context: torch.Tensor | list[torch.Tensor],
    context_null: torch.Tensor | list[torch.Tensor],
    params: SamplingParams,
    progress: ProgressFn | None = None,
    on_expert: Callable[[str], None] | None = None,
    predict: Callable[..., torch.Tensor] = guided_prediction,
    condition: Condition | None = None,
) -> tuple[torch.Tensor, dict[str, int]]:
    """The sampling loop. noise [C, F', H', W'] float32 -> final latents, and steps run per expert.

    ``experts`` maps "high_noise" and "low_noise" (or "dit", a one-expert model) to DiTs called as
    ``dit(x [1, C_in, F', H', W'], t [1] or [1, L], context)``. A guidance scale of 1.0 runs the
    conditional pass alone (uncond + 1 * (cond - uncond)), and so does every step from ``params.cfg_steps``
    on (guidance truncation, lossy, opt-in). ``condition`` adds the request's image (module docstring).
    ``on_expert(name)`` runs before an expert's first step, ``progress`` after every step.
    """
    cond = condition or Condition()
    solver = make_solver(params.solver, params.steps, params.shift)
    x, state = cond.impose(noise), solver.init_state()
    counts, names = dict.fromkeys(experts, 0), tuple(experts)
    timesteps = solver.timesteps.tolist()  # host ints: the expert choice needs no device sync
    for i, t in enumerate(timesteps):
        name = expert_for(names, t, params.boundary)
        scale = params.guidance_low_noise if name == "low_noise" else params.guidance_high_noise
        if params.cfg_steps is not None and i >= params.cfg_steps:
            scale = 1.0  # guidance truncated: one conditional pass from here on
        model = experts[name]
        if on_expert is not None and counts[name] == 0:
            on_expert(name)
        t_in = cond.timestep(t, x)
        pred = predict(model, cond.model_input(x)[None], t_in, context, context_null, scale)[0]
        x, state = solver.step(state, i, pred, x)
        x = cond.impose(x)
        counts[name] += 1
        if progress is not None:
            progress(i, len(timesteps), name)
    return x, counts


class _Timer:
    """Wall-clock stage timer; synchronises the device at stage edges only."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.timings = device, {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.sync()
        t0 = time.perf_counter()
        yield
        self.sync()
        self.timings[name] = time.perf_counter() - t0


def _decode_into(
    decode: Callable[..., torch.Tensor], z: torch.Tensor, params: SamplingParams,
    sink: Callable[[torch.Tensor], None],
) -> torch.Tensor:  # fmt: skip
    """``to_uint8_frames(decode(z)[0])`` built chunk by chunk from the decode's ``on_frames`` (each chunk
    converted as the whole video would be: the conversion is per value) into one uint8 [F, H, W, 3] CPU
    tensor; each filled slice goes to ``sink`` at once."""
    frames = torch.empty((params.frames, params.height, params.width, 3), dtype=torch.uint8)
    done = [0]

    def on_frames(chunk: torch.Tensor) -> None:  # [1, 3, f, H, W]
        t0, t1 = done[0], done[0] + chunk.shape[2]
        sink(to_uint8_frames(chunk[0], out=frames[t0:t1]))
        done[0] = t1

    decode(z, on_frames=on_frames)
    if done[0] != params.frames:
        raise RuntimeError(f"the decode handed over {done[0]} frames, expected {params.frames}")
    return frames


def _then_start_loading(experts: Experts, progress: ProgressFn | None) -> ProgressFn:
    """``progress``, then ``experts.start_loading()`` after each step: the first one's compile, cache reads
    and imports are done, and the steps that follow need no disk (``wanfast.experts``)."""

    def wrapped(i: int, n: int, name: str) -> None:
        if progress is not None:
            progress(i, n, name)
        experts.start_loading()

    return wrapped


class WanPipeline:
    """Holds the loaded models of one ``ModelSpec``; ``generate`` / ``run`` run one request."""

    def __init__(
        self,
        spec: ModelSpec,
        text_encoder,
        experts: dict[str, nn.Module],
        vae: nn.Module,
        settings: EngineSettings,
    ) -> None:
        if tuple(experts) != spec.experts:
            raise ValueError(f"{spec.name} has experts {spec.experts}, got {tuple(experts)}")
        self.spec = spec
        self.text_encoder = text_encoder
        self.experts = experts
        self.vae = vae
        self.settings = settings
        self.device = torch.device(settings.device)
        self.parallel = None  # a wanfast.parallel.ParallelRuntime when the run is split over ranks
        self.compile_cache = None  # an accel.compile_cache.CompileCache under --compile-cache

    @property
    def experts(self) -> Experts:
        """name -> DiT; an entry may still be loading (``wanfast.experts``: reading it waits)."""
        return self._experts

    @experts.setter
    def experts(self, experts: Mapping[str, nn.Module]) -> None:  # an Experts as given, else a copy
        self._experts = experts if isinstance(experts, Experts) else Experts(experts)

    @property
    def defaults(self):
        return self.spec.defaults

    def params(self, prompt: str, image=None, **overrides: object) -> SamplingParams:
        """Validated sampling parameters (``specs.resolve_params``: the model's defaults, then the non-None
        overrides). ``image``: the request's image (anything ``wanfast.image.load_image`` takes) or its
        (width, height); with one, the size is the maximum area."""
        if image is not None and not isinstance(image, tuple):
            from wanfast.image import load_image

            image = load_image(image).size
        return resolve_params(self.spec, prompt, image_size=image, **overrides)

    def generate(
        self,
        prompt: str,
        image=None,
        negative_prompt: str | None = None,
        size: tuple[int, int] | str | None = None,
        frames: int | None = None,
        steps: int | None = None,
        seed: int = 0,
        solver: str | None = None,
        shift: float | None = None,
        guidance: float | None = None,
        guidance_high_noise: float | None = None,
        guidance_low_noise: float | None = None,
        boundary: float | None = None,
        progress: ProgressFn | None = None,
        cfg_steps: int | None = None,
        step_cache_threshold: float | None = None,
        sampling_preset: str | None = None,
    ) -> GenerationResult:
        """One video. ``image``: a path, image bytes, a PIL image or a [3, H, W] tensor (uint8 or float in
        [0, 1]), for a model that takes one (``spec.image``); ``guidance`` sets every expert's scale."""
        img = None
        if image is not None:
            from wanfast.image import load_image

            img = load_image(image)
        params = resolve_params(
            self.spec, prompt, image_size=img.size if img is not None else None, negative_prompt=negative_prompt,
            size=size, frames=frames, steps=steps, seed=seed, solver=solver, shift=shift, guidance=guidance,
            guidance_high_noise=guidance_high_noise, guidance_low_noise=guidance_low_noise, boundary=boundary,
            cfg_steps=cfg_steps, step_cache_threshold=step_cache_threshold, sampling_preset=sampling_preset,
        )  # fmt: skip
        return self.run(params, progress, image=img)

    def step_cache(self, params: SamplingParams, context: list, context_null: list) -> StepCache | None:
        """The request's step cache (accel/stepcache.py), or None when ``params.step_cache_threshold`` is
        0. Branches are named by the two context objects the loop passes every step; the final timestep
        is always computed; under Ulysses the skip decision is agreed over the sequence group."""
        if not params.step_cache_threshold > 0:
            return None
        last_t = make_solver(params.solver, params.steps, params.shift).timesteps[-1].item()
        group = self.parallel.mesh.sp_group if self.parallel else None
        branches = {"cond": context, "uncond": context_null}
        return StepCache(params.step_cache_threshold, branches, (last_t,), group)

    @torch.inference_mode()
    def run(
        self,
        params: SamplingParams,
        progress: ProgressFn | None = None,
        image=None,
        on_stage: Callable[[str], None] | None = None,
        frames_sink: Callable[[torch.Tensor], None] | None = None,
    ) -> GenerationResult:
        """One request: ``params`` from ``self.params`` (its size already the image's when there is one),
        ``image`` a ``PIL.Image`` (``wanfast.image.load_image``) for a model that takes one. ``on_stage``
        is told "vae_decode" when the decode starts (the steps' progress says nothing there).
        ``frames_sink``: given the video's uint8 [f, H, W, 3] CPU frames as the decode makes them, in order
        (``video.Mp4Writer.add``: the MP4 is encoded during the decode); they are slices of
        ``result.frames``, which is the same with or without a sink. Only the process that writes the
        video needs one (under a split, every rank decodes)."""
        conditioning = CONDITIONINGS[self.spec.conditioning]
        if (image is None and self.spec.image == "required") or (
            image is not None and self.spec.image == "none"
        ):
            raise ValueError(
                f"{self.spec.name}: " + ("an image is required" if image is None else "takes no image")
            )
        reset_caches(self)  # per-request caches (cross-attention K/V of the last prompts) start empty
        timer = _Timer(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t_start = time.perf_counter()
        with timer.stage("text_encoding"):
            prompts, par = [params.prompt, params.negative_prompt], self.parallel
            if par:  # split runs: encoded once, on rank 0, and broadcast
                context, context_null = par.encode(self.text_encoder, prompts, self.device)
            else:
                context, context_null = self.text_encoder.encode(prompts)
            context, context_null = context.to(self.device), context_null.to(self.device)

        generator = torch.Generator(self.device).manual_seed(params.seed)
        shape = params.latent_shape(self.vae.cfg)
        noise = torch.randn(shape, dtype=torch.float32, device=self.device, generator=generator)

        # Per-expert time: one device sync when the expert changes, none in the other steps.
        stamps: list[tuple[str, float]] = []

        def on_expert(name: str) -> None:
            timer.sync()
            stamps.append((name, time.perf_counter()))

        with timer.stage("conditioning"):
            condition = conditioning.prepare(self.spec, self.vae, image, params, self.device)

        size = (params.width, params.height, params.frames)
        if self.compile_cache is not None:  # this size's compiled graphs, if an earlier process saved them
            self.compile_cache.load([size])
        ctx, ctx_null = [context], [context_null]  # the same two objects every step (step-cache branches)
        if self.experts.loading():  # a fresh process: the deferred expert's read starts after the first step
            progress = _then_start_loading(self.experts, progress)
        cache, counter = self.step_cache(params, ctx, ctx_null), ForwardCounter(self.experts)
        with timer.stage("denoise"), installed(self.experts, cache):
            latents, counts = denoise(
                counter.experts, noise, ctx, ctx_null, params, progress, on_expert,
                par.predict if par else guided_prediction, condition,
            )  # fmt: skip
        edges = [s[1] for s in stamps] + [time.perf_counter()]
        for (name, _), a, b in zip(stamps, edges[:-1], edges[1:], strict=True):
            timer.timings[f"denoise_{name}"] = b - a
        if on_stage is not None:
            on_stage("vae_decode")
        with timer.stage("vae_decode"):
            vae_dtype = next(self.vae.parameters()).dtype
            z = latents[None].to(vae_dtype)
            decode = functools.partial(par.decode, self.vae) if par else self.vae.decode  # split: tiles
            if frames_sink is None:
                frames = to_uint8_frames(decode(z)[0])
            else:
                frames = _decode_into(decode, z, params, frames_sink)
        timings = dict(timer.timings)
        timings["total"] = time.perf_counter() - t_start
        if self.compile_cache is not None:  # outside the timed stages; a no-op once this size's file exists
            self.compile_cache.save(size)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return GenerationResult(
            frames=frames,
            latents=latents.float().cpu(),
            params=params,
            timings=timings,
            steps_per_expert=counts,
            forwards=counter.summary(cache),
            peak_memory_bytes=peak,
        )
