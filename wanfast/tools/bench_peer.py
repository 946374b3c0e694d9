"""The two implementations ``wanfast bench`` times side by side, and the clock it times them with.

``WanfastSide`` builds wanfast's models with random weights under one ``EngineSettings`` (optimised by
``wanfast.accel``); ``DiffusersSide`` builds the same work through ``WanTransformer3DModel``,
``AutoencoderKLWan`` and ``diffusers.WanPipeline``, also random and built directly on the device. Both have
the same methods, so ``wanfast.tools.bench`` measures them with the same code. Diffusers is imported only
inside ``DiffusersSide`` and its helpers, only when the peer is asked for.
"""

from __future__ import annotations

import importlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from wanfast.config import ConfigError, EngineSettings, SamplingParams
from wanfast.pipeline import denoise
from wanfast.specs import ModelSpec
from wanfast.tools import synthetic
from wanfast.tools.diffusers_models import (  # noqa: F401 - version: re-exported for bench
    make_pipeline,
    pad_text,
    random_transformer,
    random_vae,
    version,
)
from wanfast.tools.synthetic import random_text_encoder

Loop = Callable[[int, Callable[[], None]], None]  # loop(n steps, called after each step)


def _accel(module: str = "wanfast.accel"):
    """``wanfast.accel`` (or a submodule), loudly: an engine timed without its settings applied would be
    reported under a name it did not earn."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("wanfast.accel"):
            raise
        raise ConfigError(f"{e.name} is not importable: the bench cannot apply engine settings") from e


class Clock:
    """Host-side timing of device work: CUDA events after a sync on CUDA, perf_counter elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.cuda = device, device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def resident(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def once(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.sync()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    def sample(self, fn: Callable[[], object], warmup: int, repeats: int) -> dict:
        """Median of ``repeats`` calls after ``warmup``; peak memory over the measured calls."""
        resident = self.resident()
        warm = [self.once(fn) for _ in range(warmup)]
        self.reset_peak()
        times = [self.once(fn) for _ in range(repeats)]
        return _timed(times, warm, self.peak(), resident)

    def steps(self, loop: Loop, warmup: int, repeats: int) -> dict:
        """Per-step times of one real denoising loop of warmup + repeats steps, stamped after every step
        (one sync per step: negligible against seconds-long steps, and the same for every engine)."""
        resident = self.resident()
        stamps = [self.now()]

        def on_step() -> None:
            stamps.append(self.now())
            if len(stamps) == warmup + 1:
                self.reset_peak()

        if warmup == 0:
            self.reset_peak()
        loop(warmup + repeats, on_step)
        times = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
        return _timed(times[warmup:], times[:warmup], self.peak(), resident)


def _timed(times: list[float], warm: list[float], peak: int | None, resident: int | None) -> dict:
    return {"seconds": statistics.median(times), "times_s": times, "warmup_times_s": warm,
            "peak_memory_bytes": peak, "resident_bytes": resident}  # fmt: skip


@dataclass
class Inputs:
    """One size's inputs, shared by every engine so all time the same work."""

    x: torch.Tensor  # [1, C, F', H/8, W/8] float32 noisy latents
    t: torch.Tensor  # [1] timestep
    ctx: torch.Tensor  # [L, text_dim] prompt states
    ctx_null: torch.Tensor  # [L', text_dim] negative-prompt states
    z: torch.Tensor  # [1, C, F', H/8, W/8] normalised latents for the VAE decode
    # TI2V (first-frame conditioning): the per-token timestep [1, L] of image mode (first frame's tokens at
    # 0), which both implementations get in their own form (wanfast factored, Diffusers dense); else None
    t_tokens: torch.Tensor | None = None


def make_inputs(
    preset: ModelSpec, params: SamplingParams, device: torch.device, dtype: torch.dtype
) -> Inputs:
    g = torch.Generator(device).manual_seed(params.seed)
    shape = (1, *params.latent_shape(preset.vae))
    # the DiT's input: I2V concatenates mask and image latents to the noise (in_dim 36 for 16 latents)
    x_shape = (1, preset.dit.in_dim, *shape[2:])
    n, d = preset.dit.text_len, preset.dit.text_dim

    def states(length: int) -> torch.Tensor:  # real prompts are ~20 tokens, the negative one ~120
        return (0.1 * torch.randn(min(length, n), d, generator=g, device=device)).to(dtype)

    x = torch.randn(x_shape, generator=g, device=device)
    t = torch.full((1,), 999.0, device=device)
    t_tokens = None
    if preset.conditioning == "first_frame":
        p = preset.dit.patch_size
        per_frame = (shape[3] // p[1]) * (shape[4] // p[2])
        t_tokens = torch.full((1, shape[2] // p[0] * per_frame), 999.0, device=device)
        t_tokens[:, :per_frame] = 0.0
    return Inputs(x, t, states(24), states(128), torch.randn(shape, generator=g, device=device), t_tokens)


class _Side:
    """What both implementations are built from. Seed offsets follow ``random_pipeline``'s."""

    def __init__(
        self, preset: ModelSpec, device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype, seed: int
    ) -> None:
        self.preset, self.device, self.seed = preset, device, seed
        self.dtype, self.vae_dtype = dtype, vae_dtype
        self.text_len = preset.dit.text_len


class WanfastSide(_Side):
    """Builds and runs wanfast's models (random weights) under one engine setting at a time."""

    impl = "wanfast"

    def build_dit(self, settings: EngineSettings) -> nn.Module:
        dit = synthetic.random_dit(self.preset, self.device, self.dtype, self.seed + 1)
        return _accel().optimize_dit(dit, settings)

    def forward(self, dit, inp: Inputs) -> Callable[[], object]:
        t = inp.t
        if inp.t_tokens is not None:  # image mode, as the pipeline passes it: factored, no host sync
            from wanfast.models.dit import first_frame_timesteps

            p = self.preset.dit.patch_size
            t = first_frame_timesteps(inp.t, tuple(n // q for n, q in zip(inp.x.shape[2:], p, strict=True)))
        return lambda: dit(inp.x, t, [inp.ctx])

    def steps(self, dit, inp: Inputs, params: SamplingParams) -> Loop:
        """The pipeline's own denoising loop with one expert in both roles (the experts are the same size)."""

        def loop(n: int, on_step: Callable[[], None]) -> None:
            denoise(dict.fromkeys(self.preset.experts, dit), inp.x[0], [inp.ctx], [inp.ctx_null],
                    params.with_(steps=n), progress=lambda *_: on_step())  # fmt: skip

        return loop

    def build_text(self):
        return random_text_encoder(self.preset, self.device, self.dtype, self.seed + 3)

    def text(self, te, prompt: str, negative: str) -> Callable[[], object]:
        return lambda: te.encode([prompt, negative])

    def build_vae(self, settings: EngineSettings) -> nn.Module:
        vae = synthetic.random_vae(self.preset, self.device, self.vae_dtype, self.seed + 4)
        return _accel("wanfast.accel.vae").optimize_vae(vae, settings)

    def vae(self, vae, inp: Inputs) -> Callable[[], object]:
        return lambda: vae.decode(inp.z.to(self.vae_dtype))

    def build_pipeline(self, settings: EngineSettings):
        args = (self.preset, str(self.device), self.dtype, self.vae_dtype, self.seed)
        pipe = synthetic.random_pipeline(*args, settings=settings)  # optimised by accel with ``settings``
        if pipe.settings != settings:
            raise RuntimeError(f"random_pipeline ran {pipe.settings}, not the engine's {settings}")
        # A no-op where the pipeline's own optimisation already did it.
        pipe.vae = _accel("wanfast.accel.vae").optimize_vae(pipe.vae, settings)
        return pipe

    def generate(self, pipe, params: SamplingParams, clock: Clock) -> dict:
        stamps: list[float] = []
        image = None
        if (
            self.preset.image == "required"
        ):  # I2V: a random image of the output size (its content is not timed)
            import numpy as np
            from PIL import Image

            rng = np.random.default_rng(self.seed)
            image = Image.fromarray(rng.integers(0, 256, (params.height, params.width, 3), dtype=np.uint8))
        res = pipe.run(params, progress=lambda *_: stamps.append(clock.now()), image=image)
        t = res.timings
        between = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
        steps = [t["denoise"] - sum(between), *between]  # no stamp before step 1: the rest of the stage
        return {"seconds": t["total"], "peak_memory_bytes": res.peak_memory_bytes, "step_times_s": steps,
                "stages_s": {k: t[k] for k in ("text_encoding", "conditioning", "denoise", "vae_decode")},
                "steps_per_expert": res.steps_per_expert, "latents": res.latents}  # fmt: skip


class DiffusersSide(_Side):
    """Builds and runs the Diffusers models; ``wanfast.tools.bench`` times them."""

    impl = "diffusers"

    def settings(self) -> dict:
        return {"dtype": str(self.dtype), "vae_dtype": str(self.vae_dtype), "attention": "Diffusers default",
                "diffusers": version()}  # fmt: skip

    # one DiT forward / denoising steps ----------------------------------------------------------------
    def build_dit(self, settings=None) -> nn.Module:
        return random_transformer(self.preset, self.device, self.dtype, self.seed + 1)

    def forward(self, model: nn.Module, inp: Inputs) -> Callable[[], object]:
        x, ctx = inp.x.to(self.dtype), pad_text(inp.ctx, self.text_len)
        t = inp.t if inp.t_tokens is None else inp.t_tokens  # TI2V: [1, L], as its pipeline passes it
        return lambda: model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]

    def steps(self, model: nn.Module, inp: Inputs, params: SamplingParams) -> Loop:
        """Diffusers' own denoising loop (both guidance passes, CFG, UniPC step) on one expert, no VAE."""
        pipe = make_pipeline(self.preset, transformer=model)
        ctx, ctx_null = pad_text(inp.ctx, self.text_len), pad_text(inp.ctx_null, self.text_len)

        def loop(n: int, on_step: Callable[[], None]) -> None:
            pipe(
                prompt_embeds=ctx, negative_prompt_embeds=ctx_null, height=params.height, width=params.width,
                num_frames=params.frames, num_inference_steps=n, guidance_scale=params.guidance_high_noise,
                latents=inp.x, output_type="latent", callback_on_step_end=lambda *_: on_step() or {},
            )  # fmt: skip

        return loop

    # text encoding: the same UMT5 model as wanfast's, through Diffusers' encode_prompt --------------------
    def build_text(self):
        te = random_text_encoder(self.preset, self.device, self.dtype, self.seed + 3)
        return make_pipeline(self.preset, text_encoder=te)

    def text(self, pipe, prompt: str, negative: str) -> Callable[[], object]:
        return lambda: pipe.encode_prompt(prompt, negative, do_classifier_free_guidance=True,
                                          max_sequence_length=self.text_len, device=self.device)  # fmt: skip

    # VAE decode -----------------------------------------------------------------------------------------
    def build_vae(self, settings=None) -> nn.Module:
        return random_vae(self.preset, self.device, self.vae_dtype, self.seed + 4)

    def vae(self, vae: nn.Module, inp: Inputs) -> Callable[[], object]:
        cfg = self.preset.vae
        mean = torch.tensor(cfg.latents_mean, device=self.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=self.device).view(1, -1, 1, 1, 1)
        z = (inp.z * std + mean).to(self.vae_dtype)  # Diffusers' decode takes un-normalised latents
        return lambda: vae.decode(z, return_dict=False)[0]

    # whole generation -----------------------------------------------------------------------------------
    def build_pipeline(self, settings=None):
        te = random_text_encoder(self.preset, self.device, self.dtype, self.seed + 3)
        return make_pipeline(
            self.preset, text_encoder=te,
            transformer=random_transformer(self.preset, self.device, self.dtype, self.seed + 1),
            transformer_2=(random_transformer(self.preset, self.device, self.dtype, self.seed + 2)
                           if self.preset.two_experts else None),
            vae=random_vae(self.preset, self.device, self.vae_dtype, self.seed + 4),
        )  # fmt: skip

    def generate(self, pipe, params: SamplingParams, clock: Clock) -> dict:
        """One ``pipe(...)`` call, timed as a whole and per stage: ``encode_prompt`` and ``vae.decode`` are
        wrapped for the call, steps are stamped from ``callback_on_step_end`` (one sync per step)."""
        stages: dict[str, float] = {}
        stamps: list[float] = []

        def timed(name: str, fn: Callable) -> Callable:
            def wrapper(*args, **kwargs):
                t0 = clock.now()
                out = fn(*args, **kwargs)
                end = clock.now()
                stages[name] = end - t0
                if name == "text_encoding":
                    stamps.append(end)  # the denoising loop starts here
                return out

            return wrapper

        if self.preset.two_experts:
            pipe.register_to_config(boundary_ratio=params.boundary)
        pipe.encode_prompt = timed("text_encoding", pipe.encode_prompt)
        pipe.vae.decode = timed("vae_decode", pipe.vae.decode)
        clock.reset_peak()
        try:
            t0 = clock.now()
            pipe(
                prompt=params.prompt, negative_prompt=params.negative_prompt, height=params.height,
                width=params.width, num_frames=params.frames, num_inference_steps=params.steps,
                guidance_scale=params.guidance_high_noise,
                guidance_scale_2=params.guidance_low_noise if self.preset.two_experts else None,
                generator=torch.Generator(self.device).manual_seed(params.seed), output_type="np",
                max_sequence_length=self.text_len,
                callback_on_step_end=lambda *_: stamps.append(clock.now()) or {},
            )  # fmt: skip
            total = clock.now() - t0
        finally:
            del pipe.encode_prompt, pipe.vae.decode
        steps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
        stages["denoise"] = sum(steps)
        return {"seconds": total, "stages_s": stages, "step_times_s": steps, "peak_memory_bytes": clock.peak(),
                "latents": None}  # fmt: skip
