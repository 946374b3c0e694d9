"""Frozen configuration types.

Three kinds, never mixed:
- architecture (``DiTConfig``, ``VAEConfig``, ``TextEncoderConfig``): read from a checkpoint or a preset;
- per-request sampling parameters (``SamplingParams``);
- per-process engine settings (``EngineSettings``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a dtype or device is resolved: `wanfast --help` needs none
    import torch

# The official Wan2.1/2.2 default negative prompt (wan/configs/shared_config.py, sample_neg_prompt).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

SOLVERS = ("unipc", "dpm++", "euler")
COMPILE_MODES = ("coordinate-descent", "max-autotune")  # EngineSettings.compile_mode (accel/compile.py)
NUM_TRAIN_TIMESTEPS = 1000


class ConfigError(ValueError):
    """An invalid configuration or request, raised before any weights load."""


@dataclass(frozen=True)
class DiTConfig:
    """WanDiT architecture. Field names follow the official ``config.json`` of a Wan2.2 expert."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    freq_dim: int = 256
    text_len: int = 512
    text_dim: int = 4096
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ConfigError(f"head_dim {self.head_dim} must be even and >= 6 for 3-axis RoPE")
        if self.freq_dim % 2:
            raise ConfigError(f"freq_dim {self.freq_dim} must be even")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_axes_dim(self) -> tuple[int, int, int]:
        """Head-dim split between the (t, h, w) RoPE axes: d - 4(d//6), 2(d//6), 2(d//6)."""
        d = self.head_dim
        return (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))

    def num_params(self) -> int:
        d, f, p = self.dim, self.ffn_dim, self.patch_size
        patch = self.in_dim * p[0] * p[1] * p[2] * d + d
        text = self.text_dim * d + d + d * d + d
        time = self.freq_dim * d + d + d * d + d + d * 6 * d + 6 * d
        attn = 4 * (d * d + d) + (2 * d if self.qk_norm else 0)
        block = 2 * attn + 2 * d * f + f + d + 6 * d + (2 * d if self.cross_attn_norm else 0)
        head = d * self.out_dim * p[0] * p[1] * p[2] + self.out_dim * p[0] * p[1] * p[2] + 2 * d
        return patch + text + time + self.num_layers * block + head


def _check_vae(cfg) -> None:
    """What both VAE configs need: one latent statistic per channel, one time flag per resampling stage."""
    if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
        raise ConfigError(f"latents_mean/std need {cfg.z_dim} values")
    if len(cfg.temporal_downsample) != len(cfg.dim_mult) - 1:
        raise ConfigError("temporal_downsample needs len(dim_mult) - 1 entries")


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 causal 3D VAE (stride 4x8x8). ``dim`` is the base channel count."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = (
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    )  # fmt: skip
    latents_std: tuple[float, ...] = (
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    )  # fmt: skip

    def __post_init__(self) -> None:
        _check_vae(self)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


@dataclass(frozen=True)
class VAE22Config:
    """Wan2.2 causal 3D VAE (TI2V-5B; stride 4x16x16): a ``patch_size`` x ``patch_size`` pixel patchify
    (3 -> 12 channels) around a causal conv stack with residual resampling shortcuts. ``dim`` is the
    encoder's base channel count, ``dec_dim`` the decoder's."""

    kind = "wan2.2"  # not a field: which VAE family a config describes (VAEConfig is the Wan2.1 one)

    dim: int = 160
    dec_dim: int = 256
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    patch_size: int = 2
    latents_mean: tuple[float, ...] = (
        -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
        -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
        -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
        -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
        -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
        0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
    )  # fmt: skip
    latents_std: tuple[float, ...] = (
        0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
        0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
        0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
        0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
        0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
        0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
    )  # fmt: skip

    def __post_init__(self) -> None:
        _check_vae(self)
        if min(self.dim, self.dec_dim, self.z_dim, self.num_res_blocks, self.patch_size, *self.dim_mult) < 1:
            raise ConfigError(
                f"dim, dec_dim, z_dim, num_res_blocks, patch_size and dim_mult must be >= 1; got {self.dim}, "
                f"{self.dec_dim}, {self.z_dim}, {self.num_res_blocks}, {self.patch_size}, {self.dim_mult}"
            )
        # The parameter-free shortcuts regroup channels: a stage of c_in -> c_out channels that resamples by a
        # factor f (time x height x width) averages c_in * f / c_out values (encoder) or repeats each input
        # channel c_out * f / c_in times (decoder); both must be whole numbers.
        n = len(self.dim_mult)
        enc = [self.dim * m for m in (1, *self.dim_mult)]
        dec = [self.dec_dim * m for m in (self.dim_mult[-1], *reversed(self.dim_mult))]
        for i in range(n):
            last = i == n - 1
            f_down = 1 if last else 4 * (2 if self.temporal_downsample[i] else 1)
            if (enc[i] * f_down) % enc[i + 1]:
                raise ConfigError(f"encoder stage {i}: {enc[i]} x {f_down} is not a multiple of {enc[i + 1]}")
            f_up = 1 if last else 4 * (2 if self.temporal_downsample[n - 2 - i] else 1)
            if not last and (dec[i + 1] * f_up) % dec[i]:
                raise ConfigError(f"decoder stage {i}: {dec[i + 1]} x {f_up} is not a multiple of {dec[i]}")

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * self.patch_size


@dataclass(frozen=True)
class TextEncoderConfig:
    """UMT5 encoder. The XXL values are the defaults; the head count of a checkpoint comes from its
    relative-position tables ([num_buckets, num_heads])."""

    vocab_size: int = 256384
    dim: int = 4096
    ffn_dim: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    head_dim: int = 64
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512


@dataclass(frozen=True)
class SamplingParams:
    """One request, validated on construction, before any weights load. The model's values (size,
    frames, steps, ...) have no defaults here: ``wanfast.specs.resolve_params`` fills them from the model's
    ``SamplingDefaults``, and checks its own rules (size multiple, frames per VAE stride)."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    frames: int
    steps: int
    solver: str
    shift: float
    guidance_high_noise: float  # a one-expert model's scale is held in both guidance fields
    guidance_low_noise: float
    boundary: float  # unused by a one-expert model
    seed: int = 0
    cfg_steps: int | None = None  # guidance truncation: CFG for the first K steps only (None: every step)
    # step caching (lossy, opt-in): a DiT forward is skipped while the accumulated relative change of the
    # first block's modulated input stays under this threshold; 0.0 = off (accel/stepcache.py)
    step_cache_threshold: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ConfigError("prompt must be a non-empty string")
        # the model's own rules (size multiple, frames per VAE stride) are ``specs.check_params``'
        for name in ("width", "height", "frames"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"unknown solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")
        if not self.shift > 0:
            raise ConfigError(f"shift must be > 0, got {self.shift!r}")
        if not 0.0 <= self.boundary <= 1.0:
            raise ConfigError(f"boundary must be in [0, 1], got {self.boundary!r}")
        if self.guidance_high_noise < 0 or self.guidance_low_noise < 0:
            raise ConfigError("guidance scales must be >= 0")
        if self.cfg_steps is not None and (not isinstance(self.cfg_steps, int) or self.cfg_steps < 0):
            raise ConfigError(f"cfg_steps must be an integer >= 0 (or unset), got {self.cfg_steps!r}")
        if not isinstance(self.step_cache_threshold, (int, float)) or not self.step_cache_threshold >= 0:
            raise ConfigError(
                f"step_cache_threshold must be >= 0 (0 = off), got {self.step_cache_threshold!r}"
            )
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed!r}")

    def latent_shape(self, vae: VAEConfig) -> tuple[int, int, int, int]:
        """[C, F', H/s, W/s] of the initial noise (s: the VAE's spatial stride), as official."""
        return (
            vae.z_dim,
            (self.frames - 1) // vae.temporal_stride + 1,
            self.height // vae.spatial_stride,
            self.width // vae.spatial_stride,
        )

    def with_(self, **changes: object) -> SamplingParams:
        return replace(self, **changes)


DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}  # name -> torch attribute  # fmt: skip


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file and its strength on each expert (a one-DiT model takes ``strength_high_noise``)."""

    path: str
    strength_high_noise: float = 1.0
    strength_low_noise: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``FILE[:HIGH[:LOW]]`` (the CLI form): LOW defaults to HIGH, HIGH to 1. Trailing fields that are
        not numbers belong to the path (a path may hold ':')."""
        parts = text.split(":")
        nums: list[float] = []
        while len(parts) > 1 and len(nums) < 2:
            try:
                nums.insert(0, float(parts[-1]))
            except ValueError:
                break
            parts.pop()
        path = ":".join(parts)
        if not path:
            raise ConfigError(f"--lora {text!r}: no file (FILE[:HIGH[:LOW]])")
        high = nums[0] if nums else 1.0
        return cls(path, high, nums[1] if len(nums) > 1 else high)


@dataclass(frozen=True)
class EngineSettings:
    """Per-process settings: where models run and which optimisations ``wanfast.accel`` applies.

    Every optimisation has its own off switch; ``None`` means "on where it pays" (decided by accel,
    e.g. torch.compile only on CUDA). ``plain()`` turns every one off: the eager reference path.
    """

    device: str | None = None  # None: "cuda" when available, else "cpu" (``resolved``)
    dtype: torch.dtype | None = None  # DiT and text encoder; None: bf16 on CUDA, fp32 on the CPU
    text_encoder_device: str | None = None  # None: same as ``device``
    vae_dtype: torch.dtype | None = None  # None: float32, as the official pipeline runs its VAE
    attention_backend: str = "auto"
    # the DiT's self-attention only (cross-attention keeps attention_backend); None: attention_backend.
    # The lossy 8-bit kernels are meant for this slot: self-attention is ~70% of a 720p forward.
    self_attention_backend: str | None = None
    memory_budget_gb: float | None = None  # pick the fastest memory mode that fits this many GiB
    fuse_projections: bool = True  # one QKV GEMM for self-attention, one KV GEMM for cross-attention
    cache_cross_kv: bool = True  # cross-attention K/V computed once per (expert, prompt), reused every step
    cache_rope: bool = True  # RoPE cos/sin tables computed once per (grid, device)
    compile: bool | None = None  # regional torch.compile of each DiT block; None: on for CUDA
    # None: inductor's defaults; "coordinate-descent" tunes the fused kernels' launch configs, "max-autotune"
    # also autotunes GEMM templates (accel/compile.py COMPILE_MODES; longer first compile, measure first)
    compile_mode: str | None = None
    # a folder for torch.compile's artifacts, reused by later processes and machines (accel/compile_cache.py);
    # None: inductor's default per-user temporary cache
    compile_cache: str | None = None
    cuda_graphs: bool = False  # capture the DiT forward in a CUDA graph (off unless measured to pay)
    optimize_vae: bool = True  # VAE decode layout/algorithm choices from accel.vae (measured)
    quant: str | None = None  # lossy, opt-in: "fp8" = FP8 e4m3 DiT linears (accel.fp8)
    # FP8 linears fed by an opaque kernel (attention out, FFN GELU) quantise their input with wanfast's
    # one-pass Triton kernel (kernels/rowquant.py) instead of torch ops; no effect without FP8 linears
    fp8_row_kernels: bool = True
    cfg_parallel: bool = False  # multi-GPU: cond / uncond passes on two rank groups (parallel/)
    ulysses: int = 1  # multi-GPU: sequence-parallel degree inside a group (parallel/)
    # Ulysses: head groups per rank whose all-to-alls overlap the attention (parallel/ulysses.py); must divide
    # num_heads / ulysses; 1 = off (blocking collectives, the measured path); no effect when ulysses == 1
    ulysses_chunks: int = 1
    offload: str | None = None  # memory mode: "expert" (idle expert in pinned CPU memory) | "blocks"
    # LoRAs merged in order (loading/lora.py), each with a strength per expert; ``lora_stack()`` adds the
    # shorthands below, the one place both forms meet
    loras: tuple[LoraSpec, ...] = ()
    lora_high_noise: str | None = None  # shorthand: LoRA file for the high-noise expert at lora_strength
    lora_low_noise: str | None = None  # shorthand: LoRA file for the low-noise expert at lora_strength
    lora_strength: float = 1.0
    lora_merge: bool = True  # merged into the weights (no runtime cost) or kept separate and switchable
    # two-expert models: the low-noise expert loads (and is optimised) in a thread from the end of the first
    # step on, beside the high-noise steps, when read from a checkpoint, resident, unsplit (builder.overlap_rule)
    overlap_load: bool = True

    def __post_init__(self) -> None:
        chunks = self.ulysses_chunks
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ConfigError(f"ulysses_chunks must be an integer >= 1, got {chunks!r}")

    @property
    def split(self) -> bool:
        """Whether a video is split over several ranks (CFG-parallel, Ulysses, or both)."""
        return self.cfg_parallel or self.ulysses > 1

    def lora_stack(self) -> tuple[LoraSpec, ...]:
        """Every LoRA to apply: ``loras`` then the shorthand files (each on its own expert only)."""
        extra = []
        if self.lora_high_noise:
            extra.append(LoraSpec(self.lora_high_noise, self.lora_strength, 0.0))
        if self.lora_low_noise:
            extra.append(LoraSpec(self.lora_low_noise, 0.0, self.lora_strength))
        return tuple(self.loras) + tuple(extra)

    def plain(self) -> EngineSettings:
        """Every optimisation off, the VAE decode rewrite included: the eager reference path."""
        return replace(
            self,
            fuse_projections=False,
            cache_cross_kv=False,
            cache_rope=False,
            compile=False,
            cuda_graphs=False,
            fp8_row_kernels=False,
            optimize_vae=False,
        )

    def resolved(self) -> EngineSettings:
        """Device and dtypes settled: the one place their defaults live. Raises ``ConfigError`` for a
        CUDA device on a machine without CUDA."""
        import torch

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
        dtype = parse_dtype(self.dtype) if self.dtype is not None else None
        dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
        vae_dtype = parse_dtype(self.vae_dtype) if self.vae_dtype is not None else torch.float32
        return replace(self, device=device, dtype=dtype, vae_dtype=vae_dtype)

    def to_json(self) -> dict:
        """A JSON-able dict (dtypes by name): how the server hands settings to its workers."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in ("dtype", "vae_dtype"):
            out[k] = None if out[k] is None else str(out[k]).removeprefix("torch.")
        out["loras"] = [[x.path, x.strength_high_noise, x.strength_low_noise] for x in self.loras]
        return out

    @classmethod
    def from_json(cls, d: dict) -> EngineSettings:
        d = dict(d)
        for k in ("dtype", "vae_dtype"):
            d[k] = None if d.get(k) is None else parse_dtype(d[k])
        d["loras"] = tuple(LoraSpec(*x) for x in d.get("loras", ()))
        return cls(**d)
