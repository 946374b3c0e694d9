"""Sampling presets for distilled LoRAs: the values those LoRAs were distilled for.

``lightning-4step``: the Wan2.2-Lightning T2V-A14B 4-step LoRAs (lightx2v, "Seko" V1 / V1.1, rank 64,
one file per expert: ``high_noise_model.safetensors`` and ``low_noise_model.safetensors``). Sources: the
lightx2v Wan2.2-Lightning repository, ``wan/configs/wan_t2v_A14B.py`` (its inference section) and
``wan/text2video.py`` (its ``euler`` solver branch), and its README ("4 steps without the need of CFG").

Known difference: Lightning's Euler scheduler shifts ``linspace(1, 0, steps + 1)``, i.e. the timesteps
1000, 937.5, 833.3, 625 at shift 5; wanfast's ``euler`` solver uses the official UniPC base schedule
(first sigma 0.999, see ``wanfast/solvers/schedule.py``), so its first timestep is ~999.8, not 1000. Both
select the experts identically at boundary 0.875.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from wanfast.config import ConfigError


@dataclass(frozen=True)
class SamplingPreset:
    """Overrides of ``SamplingParams`` (field names as there) that a distilled LoRA expects."""

    name: str
    steps: int
    guidance_high_noise: float
    guidance_low_noise: float
    solver: str
    shift: float
    boundary: float
    description: str = ""


SAMPLING_PRESETS: dict[str, dict[str, SamplingPreset]] = {  # name -> {model family conditioning: preset}
    "lightning-4step": {
        "text": SamplingPreset(
            name="lightning-4step",
            steps=4,  # wan_t2v_A14B.py: sample_steps = 4
            guidance_high_noise=1.0,  # wan_t2v_A14B.py: sample_guide_scale = (1.0, 1.0): CFG off, one pass/step
            guidance_low_noise=1.0,
            solver="euler",  # text2video.py: the "euler" branch (flow-matching Euler), used with these LoRAs
            shift=5.0,  # wan_t2v_A14B.py: sample_shift = 5.0 (base Wan2.2 T2V-A14B uses 12.0)
            boundary=0.875,  # wan_t2v_A14B.py: boundary = 0.875 (as the base model)
            description="Wan2.2-Lightning T2V-A14B 4-step LoRAs (lightx2v), one per expert",
        ),
        "concat": SamplingPreset(
            name="lightning-4step",
            steps=4,  # Wan2.2-Lightning wan/configs/wan_i2v_A14B.py: sample_steps = 4
            guidance_high_noise=1.0,  # wan_i2v_A14B.py: sample_guide_scale = (1.0, 1.0)
            guidance_low_noise=1.0,
            solver="euler",  # the Euler branch its image2video.py runs with these LoRAs, as for T2V
            shift=5.0,  # wan_i2v_A14B.py: sample_shift = 5.0 (as the base I2V-A14B)
            boundary=0.900,  # wan_i2v_A14B.py: boundary = 0.900 (as the base I2V-A14B)
            description="Wan2.2-Lightning I2V-A14B 4-step LoRAs (lightx2v), one per expert",
        ),
    },
}


def sampling_overrides(name: str, spec=None) -> dict[str, object]:
    """Keyword overrides for ``specs.resolve_params`` for the model ``spec`` (default: T2V-A14B).
    Explicit user values should be applied after these (``{**sampling_overrides(n, spec), **user}``)."""
    family = spec.conditioning if spec is not None else "text"
    model = spec.name if spec is not None else "t2v-A14B"
    if name not in SAMPLING_PRESETS:
        raise ConfigError(f"unknown sampling preset {name!r}; choose one of {', '.join(SAMPLING_PRESETS)}")
    if family not in SAMPLING_PRESETS[name] or (spec is not None and not spec.two_experts):
        raise ConfigError(f"sampling preset {name!r} is not for {model}")
    preset = SAMPLING_PRESETS[name][family]
    return {k: v for k, v in asdict(preset).items() if k not in ("name", "description")}
