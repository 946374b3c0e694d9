"""One ``ModelSpec`` per Wan2.2 generation model: everything that differs between models, in one place.

A spec holds the architecture (DiT, VAE and text-encoder configs), the experts (one, or two split at a
boundary), the size rule (the pixel multiple = VAE stride x patch size), the sampling defaults, and the
name of its conditioning (``wanfast.conditioning``: how the image, if any, enters the DiT). Adding a model
means a spec here and, if its conditioning is new, one function there; the CLI, the API, the server and
the benchmarks read the rest from the spec.

``SPECS`` holds the published models and their ``tiny`` variants (same structure, small dims: CPU demos
and tests). The spec of a checkpoint folder is decided by ``wanfast.loading.layout.detect`` from what the
folder holds; ``resolve_params`` is the one place a request is turned into validated ``SamplingParams``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from wanfast.config import (
    DEFAULT_NEGATIVE_PROMPT,
    ConfigError,
    DiTConfig,
    SamplingParams,
    TextEncoderConfig,
    VAE22Config,
    VAEConfig,
)

IMAGE_MODES = ("none", "optional", "required")
TWO_EXPERTS = ("high_noise", "low_noise")  # ordered: the high-noise expert runs first (t >= boundary)
ONE_EXPERT = ("dit",)


@dataclass(frozen=True)
class SamplingDefaults:
    """A model's recommended sampling parameters (the official ``generate.py`` / config defaults).
    A one-expert model has one guidance scale: both fields hold it, and the boundary is unused."""

    size: tuple[int, int] = (1280, 720)  # (width, height); with an image: the maximum area w * h
    frames: int = 81
    steps: int = 40
    shift: float = 12.0
    boundary: float = 0.875
    guidance_high_noise: float = 4.0
    guidance_low_noise: float = 3.0
    solver: str = "unipc"
    fps: int = 16
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT


@dataclass(frozen=True)
class ModelSpec:
    """A Wan2.2 model: configs, experts, size rule, sampling defaults and conditioning."""

    name: str
    dit: DiTConfig
    vae: VAEConfig  # or a VAE22Config: any config with z_dim, temporal_stride, spatial_stride
    text_encoder: TextEncoderConfig
    defaults: SamplingDefaults
    experts: tuple[str, ...] = TWO_EXPERTS
    conditioning: str = "text"  # a key of wanfast.conditioning.CONDITIONINGS
    image: str = "none"  # whether a request takes an image: IMAGE_MODES

    def __post_init__(self) -> None:
        if self.experts not in (TWO_EXPERTS, ONE_EXPERT):
            raise ConfigError(f"{self.name}: experts must be {TWO_EXPERTS} or {ONE_EXPERT}")
        if self.image not in IMAGE_MODES:
            raise ConfigError(f"{self.name}: image must be one of {IMAGE_MODES}")

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this: one latent pixel per VAE stride, one token per
        patch (16 for A14B: 8 x 2; 32 for TI2V-5B: 16 x 2)."""
        return self.vae.spatial_stride * self.dit.patch_size[1]

    @property
    def two_experts(self) -> bool:
        return self.experts == TWO_EXPERTS

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def expert_for(self, t: float, boundary: float) -> str:
        return expert_for(self.experts, t, boundary)

    def with_dit(self, dit: DiTConfig) -> ModelSpec:
        return replace(self, dit=dit)


def expert_for(experts: tuple[str, ...], t: float, boundary: float) -> str:
    """The expert that denoises timestep ``t`` (in [0, 1000]): high-noise while ``t >= boundary * 1000``
    (official), the only one of a one-expert model."""
    if experts != TWO_EXPERTS:
        return experts[0]
    return "high_noise" if t >= boundary * 1000 else "low_noise"


def _size(value: object, where: str = "size") -> tuple[int, int]:
    """(width, height) from a tuple/list of two ints or a "WxH" string: the one size parser."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        # ASCII digits only: int() would also take other scripts' digits and surrounding whitespace
        if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 5 for p in parts):
            raise ConfigError(f"{where} must be WIDTHxHEIGHT, e.g. 1280x720, got {value!r}")
        return int(parts[0]), int(parts[1])
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return value[0], value[1]
    raise ConfigError(f"{where} must be (width, height) or 'WxH', got {value!r}")


parse_size = _size


def resolve_params(
    spec: ModelSpec, prompt: str, image_size: tuple[int, int] | None = None, **overrides: object
) -> SamplingParams:
    """The request ``SamplingParams``: ``spec.defaults``, then every override that is not None.

    The one place each request rule lives: ``size`` may be (width, height) or "WxH" (not both with
    ``width``/``height``); an empty negative prompt means the default one (official); ``guidance`` sets
    every expert's scale (a one-expert model takes only this one); ``sampling_preset`` (a distilled
    LoRA's values, ``wanfast.presets``) applies first and explicit values win. Sizes must be multiples of
    ``spec.size_multiple``; frames ``temporal_stride * n + 1``. With an image (``image_size``: its (width,
    height)), the size is the maximum area and the model's conditioning picks the output size from the
    image's aspect ratio, as official.
    """
    if image_size is not None and spec.image == "none":
        raise ConfigError(f"{spec.name} takes no image: it is a text-to-video model")
    if image_size is None and spec.image == "required":
        raise ConfigError(f"{spec.name} needs an image (--image FILE, or image= in the API)")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    preset = overrides.pop("sampling_preset", None)
    if preset is not None:
        from wanfast.presets import sampling_overrides

        overrides = {**sampling_overrides(preset, spec), **overrides}
    if "size" in overrides:
        if "width" in overrides or "height" in overrides:
            raise ConfigError("give size or width/height, not both")
        overrides["width"], overrides["height"] = _size(overrides.pop("size"))
    if overrides.get("negative_prompt") == "":
        del overrides["negative_prompt"]  # empty means the default, as official
    guidance = overrides.pop("guidance", None)
    d = spec.defaults
    if not spec.two_experts:
        given = [k for k in ("guidance_high_noise", "guidance_low_noise", "boundary") if k in overrides]
        if given:
            raise ConfigError(f"{spec.name} has one expert: {', '.join(given)} do not apply (use guidance)")
    if guidance is not None:
        overrides.setdefault("guidance_high_noise", guidance)
        overrides.setdefault("guidance_low_noise", guidance)
    base = dict(
        prompt=prompt, negative_prompt=d.negative_prompt, width=d.size[0], height=d.size[1],
        frames=d.frames, steps=d.steps, solver=d.solver, shift=d.shift, boundary=d.boundary,
        guidance_high_noise=d.guidance_high_noise, guidance_low_noise=d.guidance_low_noise,
    )  # fmt: skip
    names = {f.name for f in fields(SamplingParams)}
    for k, v in overrides.items():
        if k not in names:
            raise ConfigError(f"unknown sampling parameter {k!r}")
        base[k] = v
    if image_size is not None:
        from wanfast.conditioning import CONDITIONINGS

        _positive_ints(base)
        area = base["width"] * base["height"]
        try:
            w, h = CONDITIONINGS[spec.conditioning].size_for_image(spec, image_size, area)
        except ZeroDivisionError:  # a side rounds to 0 cells of the grid
            w = h = 0
        if min(w, h) <= 0:
            raise ConfigError(
                f"an image of {image_size[0]}x{image_size[1]} is too elongated for a {area}-pixel area on "
                f"{spec.name}'s {spec.size_multiple}-pixel grid: use a larger --size or a less extreme image"
            )
        base["width"], base["height"] = w, h
    params = SamplingParams(**base)
    check_params(spec, params)
    return params


def _positive_ints(base: dict) -> None:
    for name in ("width", "height"):
        v = base[name]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")


def check_params(spec: ModelSpec, params: SamplingParams) -> None:
    """The model's own rules on a request (the general ones are ``SamplingParams``')."""
    m, ts = spec.size_multiple, spec.vae.temporal_stride
    for name in ("width", "height"):
        v = getattr(params, name)
        if v % m:
            raise ConfigError(f"{name} must be a positive multiple of {m} for {spec.name}, got {v!r}")
    if (params.frames - 1) % ts:
        raise ConfigError(f"frames must be {ts}n+1 (1, {ts + 1}, {2 * ts + 1}, ...), got {params.frames!r}")


_A14B_DIT = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
_TINY_DIT = DiTConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, freq_dim=32, text_len=32, text_dim=32)
_TINY_TEXT = TextEncoderConfig(
    vocab_size=512, dim=32, ffn_dim=64, num_heads=4, num_layers=2, head_dim=8, text_len=32
)
_TINY_VAE = VAEConfig(dim=8, num_res_blocks=1)
_TINY_DEFAULTS = SamplingDefaults(size=(64, 48), frames=9, steps=4, shift=5.0)

_TI2V_DIT = DiTConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48)
_TI2V_DEFAULTS = SamplingDefaults(
    size=(1280, 704), frames=121, steps=50, shift=5.0, boundary=0.0, guidance_high_noise=5.0,
    guidance_low_noise=5.0, fps=24,
)  # fmt: skip
_I2V_DEFAULTS = SamplingDefaults(  # wan/configs/wan_i2v_A14B.py
    boundary=0.900, guidance_high_noise=3.5, guidance_low_noise=3.5, shift=5.0
)

SPECS: dict[str, ModelSpec] = {
    # wan/configs/wan_t2v_A14B.py: boundary 0.875, guidance (3.0 low, 4.0 high), shift 12.0, 40 steps
    "t2v-A14B": ModelSpec(
        name="t2v-A14B",
        dit=_A14B_DIT,
        vae=VAEConfig(),
        text_encoder=TextEncoderConfig(),
        defaults=SamplingDefaults(),
    ),  # fmt: skip
    # The A14B DiT on 36 channels: noise (16) | mask (4) | image latents (16); no CLIP image encoder.
    "i2v-A14B": ModelSpec(
        name="i2v-A14B",
        dit=replace(_A14B_DIT, in_dim=36),
        vae=VAEConfig(),
        text_encoder=TextEncoderConfig(),
        defaults=_I2V_DEFAULTS,
        conditioning="concat",
        image="required",
    ),  # fmt: skip
    # One DiT on the Wan2.2 VAE's 48 channels; an optional image becomes the first latent frame.
    # wan/configs/wan_ti2v_5B.py: 1280x704, 121 frames at 24 fps, 50 steps, shift 5.0, guidance 5.0
    "ti2v-5B": ModelSpec(
        name="ti2v-5B",
        dit=_TI2V_DIT,
        vae=VAE22Config(),
        text_encoder=TextEncoderConfig(),
        defaults=_TI2V_DEFAULTS,
        experts=ONE_EXPERT,
        conditioning="first_frame",
        image="optional",
    ),  # fmt: skip
    # Small random-weight models for demos and CPU tests: same structure, tiny dims.
    "tiny": ModelSpec(
        name="tiny", dit=_TINY_DIT, vae=_TINY_VAE, text_encoder=_TINY_TEXT, defaults=_TINY_DEFAULTS
    ),
    "tiny-i2v": ModelSpec(
        name="tiny-i2v",
        dit=replace(_TINY_DIT, in_dim=36),
        vae=_TINY_VAE,
        text_encoder=_TINY_TEXT,
        defaults=replace(_TINY_DEFAULTS, boundary=0.9, guidance_high_noise=3.5, guidance_low_noise=3.5),
        conditioning="concat",
        image="required",
    ),  # fmt: skip
    "tiny-ti2v": ModelSpec(
        name="tiny-ti2v",
        dit=replace(_TINY_DIT, in_dim=48, out_dim=48),
        text_encoder=_TINY_TEXT,
        vae=VAE22Config(dim=8, dec_dim=16, num_res_blocks=1),
        experts=ONE_EXPERT,
        defaults=replace(_TI2V_DEFAULTS, size=(64, 64), frames=9, steps=4),
        conditioning="first_frame",
        image="optional",
    ),  # fmt: skip
}

# Each family (how many experts, how the image enters) by its published model and its tiny variant.
FAMILIES = {"t2v": ("t2v-A14B", "tiny"), "ti2v": ("ti2v-5B", "tiny-ti2v"), "i2v": ("i2v-A14B", "tiny-i2v")}
PUBLISHED = ("t2v-A14B", "ti2v-5B", "i2v-A14B")  # the released models (sampling defaults shown in --help)


def get_spec(name: str) -> ModelSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(SPECS)}") from None


def family_spec(
    dit: DiTConfig, vae, num_experts: int, model_type: str | None = None, where: str = ""
) -> ModelSpec:
    """The spec of a checkpoint from what it holds: the family from the number of experts and the DiT's
    input channels against the VAE's latent channels (checked against the official ``model_type`` when the
    config records one); the published model's sampling defaults when the DiT has its width and depth,
    else the family's tiny spec (a test model); the architecture always the checkpoint's own."""
    z = vae.z_dim
    if dit.out_dim != z:
        raise ConfigError(f"{where}: the DiT outputs {dit.out_dim} channels but the VAE has {z}")
    if dit.in_dim == z:
        family = "t2v" if num_experts == 2 else "ti2v"
    elif dit.in_dim == 2 * z + 4 and num_experts == 2:
        family = "i2v"
    else:
        raise ConfigError(
            f"{where}: no Wan2.2 model has {num_experts} expert(s) with {dit.in_dim} input channels for a "
            f"{z}-channel VAE"
        )
    if model_type is not None and model_type != family:
        raise ConfigError(
            f"{where}: config.json says model_type {model_type!r} but the weights are {family!r}"
        )
    names = [n for n in FAMILIES[family] if n in SPECS]
    if not names:
        raise ConfigError(f"{where}: {family} models are not supported yet")
    published = SPECS.get(FAMILIES[family][0])
    same = published is not None and (published.dit.dim, published.dit.num_layers) == (
        dit.dim,
        dit.num_layers,
    )
    base = published if same else SPECS[FAMILIES[family][1]]
    return replace(base, dit=dit, vae=vae)
