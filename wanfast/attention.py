"""One ``attention(q, k, v)`` entry point with a registry of backends.

The backend is resolved once (``set_backend`` at start-up, or lazily on first call), logged, and then
used for every call. All backends take and return ``[B, L, H, D]`` tensors (the layout the DiT produces
after its projections), so models never see backend-specific layouts.

Backends:
- ``sdpa`` (PyTorch picks), ``sdpa-cudnn`` / ``sdpa-flash`` / ``sdpa-math`` (one SDPA kernel forced);
- ``flash3`` (FlashAttention-3 on Hopper: ``flash_attn_interface``, or ``fa3_fwd_interface`` from the
  forward-only ``fa3-fwd`` wheel, the ``hopper`` extra), ``flash2`` (``flash_attn``), when importable;
- ``sage`` (SageAttention, ``sageattention``): quantised, so lossy. Only ever used when named explicitly;
- ``sage8`` (FP8 Q/K and FP8 P/V), ``sage8-pv16`` (FP8 Q/K, bf16 P/V), ``sage8-int8`` (INT8 Q/K, FP8 P/V):
  wanfast's own 8-bit Triton kernel (``wanfast/kernels/attn8.py``), Hopper only; lossy, explicit only;
- ``fa3-fp8``: FlashAttention-3's e4m3 forward kernel with wanfast's per-head quantisation and K smoothing
  (``wanfast/kernels/fp8_attention.py``), Hopper only; lossy, explicit only.

Two slots: the default backend (``set_backend``) serves every call; a separate self-attention backend
(``set_self_attention_backend``, or ``set_backend(..., self_attention=...)``) serves the calls made with
``attention(q, k, v, self_attention=True)`` (the DiT's self-attention) when set. The lossy 8-bit kernels
are meant for that slot: the DiT's self-attention is most of a 720p forward, its cross-attention is tiny.

``auto`` on CUDA takes the first available of ``_AUTO_ORDER_CUDA``, fastest measured first on the H200 at
75,600 tokens (benchmarks/results/2026-11-23_attention_kernels_h200.json): FlashAttention-3 667 TFLOP/s,
cuDNN 567, SDPA's flash kernel 356; on other devices ``sdpa``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("wanfast.attention")

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Backend:
    factory: Callable[[], AttentionFn]  # called once, when the backend is chosen
    available: Callable[[], bool]
    lossy: bool = False  # not the exact softmax attention: never chosen by "auto"


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # SDPA wants [B, H, L, D]; transposes are views, SDPA handles the strides.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _sdpa_with(backend: torch.nn.attention.SDPBackend) -> AttentionFn:
    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with torch.nn.attention.sdpa_kernel(backend):
            return _sdpa(q, k, v)

    return fn


def _cudnn_available() -> bool:
    return torch.cuda.is_available() and torch.backends.cudnn.is_available()


def _cuda_with(module: str | tuple[str, ...], min_sm: int, max_sm: int = 99) -> Callable[[], bool]:
    """Availability of a CUDA-only library backend: a GPU of the right generation, one of the modules
    importable. ``find_spec`` looks a module up without importing it (a kernel library can take seconds)."""
    modules = (module,) if isinstance(module, str) else module

    def ok() -> bool:
        if not torch.cuda.is_available() or not min_sm <= torch.cuda.get_device_capability()[0] <= max_sm:
            return False
        try:
            return any(importlib.util.find_spec(m) is not None for m in modules)
        except (ImportError, ValueError):
            return False

    return ok


# Library kernels are wrapped as torch custom ops, so torch.compile(fullgraph=True) sees one opaque node
# per call instead of tracing (or breaking on) the library's Python. The op looks its kernel up here at
# call time: a factory called again (another process-wide choice, a test) replaces the kernel.
_KERNELS: dict[str, AttentionFn] = {}
_OPS: dict[str, AttentionFn] = {}


def _library_op(name: str, load: Callable[[], AttentionFn]) -> AttentionFn:
    _KERNELS[name] = load()
    if name not in _OPS:

        @torch.library.custom_op(f"wanfast::attn_{name.replace('-', '_')}", mutates_args=())
        def op(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            out = _KERNELS[name](q, k, v)
            out = out[0] if isinstance(out, tuple) else out  # FA3 releases return out or (out, lse)
            return out.contiguous()

        @op.register_fake
        def _(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return q.new_empty(*q.shape[:-1], v.shape[-1])  # [B, Lq, H, Dv]

        _OPS[name] = op
    return _OPS[name]


_FA3_MODULES = ("flash_attn_interface", "fa3_fwd_interface")  # upstream build, forward-only wheel


def _flash3() -> AttentionFn:
    # [B, L, H, D] in and out, scale 1/sqrt(D)
    name = next(m for m in _FA3_MODULES if importlib.util.find_spec(m) is not None)
    return importlib.import_module(name).flash_attn_func


def _flash2() -> AttentionFn:
    from flash_attn import flash_attn_func  # [B, L, H, D] in and out, scale 1/sqrt(D)

    return flash_attn_func


def _sage() -> AttentionFn:
    from sageattention import sageattn

    return lambda q, k, v: sageattn(q, k, v, tensor_layout="NHD", is_causal=False)  # NHD = [B, L, H, D]


def _attn8(qk: str, pv: str) -> AttentionFn:
    from wanfast.kernels.attn8 import attn8

    return partial(attn8, qk=qk, pv=pv)  # [B, L, H, D] in and out, scale 1/sqrt(D); autotuned per shape


def _fa3_fp8() -> AttentionFn:
    from wanfast.kernels import fp8_attention

    # a plain function (not a library op): its quantisation is traced and fused by the block's compile;
    # only the FA3 call inside is an opaque custom op
    return fp8_attention.load(_flash3())


_SAGE8 = {"sage8": ("fp8", "fp8"), "sage8-pv16": ("fp8", "bf16"), "sage8-int8": ("int8", "fp8")}

_REGISTRY: dict[str, Backend] = {
    "sdpa": Backend(lambda: _sdpa, lambda: True),
    "sdpa-cudnn": Backend(
        lambda: _sdpa_with(torch.nn.attention.SDPBackend.CUDNN_ATTENTION), _cudnn_available
    ),
    "sdpa-flash": Backend(
        lambda: _sdpa_with(torch.nn.attention.SDPBackend.FLASH_ATTENTION), torch.cuda.is_available
    ),
    "sdpa-math": Backend(lambda: _sdpa_with(torch.nn.attention.SDPBackend.MATH), lambda: True),
    "flash3": Backend(lambda: _library_op("flash3", _flash3), _cuda_with(_FA3_MODULES, 9, 9)),
    "flash2": Backend(lambda: _library_op("flash2", _flash2), _cuda_with("flash_attn", 8)),
    "sage": Backend(lambda: _library_op("sage", _sage), _cuda_with("sageattention", 8), lossy=True),
    "fa3-fp8": Backend(_fa3_fp8, _cuda_with(_FA3_MODULES, 9, 9), lossy=True),
    **{
        name: Backend(
            lambda n=name, m=modes: _library_op(n, lambda: _attn8(*m)), _cuda_with("triton", 9, 9), lossy=True
        )  # fmt: skip
        for name, modes in _SAGE8.items()
    },
}

# Preference for "auto" on CUDA, fastest measured first. Lossy backends never appear here.
_AUTO_ORDER_CUDA = ("flash3", "sdpa-cudnn", "flash2", "sdpa")

_active: tuple[str, AttentionFn] | None = None
_self_active: tuple[str, AttentionFn] | None = None  # None: self-attention uses _active


def register_backend(
    name: str, factory: Callable[[], AttentionFn], available: Callable[[], bool], lossy: bool = False
) -> None:
    """Add (or replace) a backend; ``factory()`` returns a function of q, k, v [B, L, H, D]."""
    _REGISTRY[name] = Backend(factory, available, lossy)


def available_backends() -> list[str]:
    return [name for name, b in _REGISTRY.items() if b.available()]


def resolve_backend(name: str = "auto", device: str | torch.device | None = None) -> str:
    """The backend ``set_backend(name, device)`` would choose, without choosing it."""
    if name == "auto":
        is_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        order = _AUTO_ORDER_CUDA if is_cuda else ("sdpa",)
        return next(
            n for n in order if n in _REGISTRY and not _REGISTRY[n].lossy and _REGISTRY[n].available()
        )
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; registered: {', '.join(_REGISTRY)}")
    if not _REGISTRY[name].available():
        raise RuntimeError(
            f"attention backend {name!r} is not available here; available: {available_backends()}"
        )
    return name


def _build(name: str, what: str) -> tuple[str, AttentionFn]:
    backend = _REGISTRY[name]
    if backend.lossy:
        log.warning("%s backend: %s (lossy: outputs differ from exact attention)", what, name)
    else:
        log.info("%s backend: %s", what, name)
    return name, backend.factory()


def set_backend(
    name: str = "auto", device: str | torch.device | None = None, self_attention: str | None = None
) -> str:
    """Choose the backend once for this process; returns the resolved name. ``self_attention``, when
    given, also sets the self-attention slot (``set_self_attention_backend``)."""
    global _active
    _active = _build(resolve_backend(name, device), "attention")
    if self_attention is not None:
        set_self_attention_backend(self_attention, device)
    return _active[0]


def set_self_attention_backend(name: str | None, device: str | torch.device | None = None) -> str | None:
    """Choose the backend of ``attention(..., self_attention=True)`` calls; None: the default backend's.
    Returns the resolved name (None when cleared). Unknown or unavailable names raise as ``set_backend``."""
    global _self_active
    if name is None:
        _self_active = None
        log.info("self-attention backend: same as attention (%s)", active_backend() or "not chosen yet")
        return None
    _self_active = _build(resolve_backend(name, device), "self-attention")
    return _self_active[0]


def active_backend() -> str | None:
    return _active[0] if _active else None


def active_self_attention_backend() -> str | None:
    """The backend self-attention calls use: the self-attention slot's, else the default one."""
    return _self_active[0] if _self_active else active_backend()


def attention(q: Tensor, k: Tensor, v: Tensor, self_attention: bool = False) -> Tensor:
    """Softmax attention, no mask, scale 1/sqrt(D). q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].
    ``self_attention=True`` (the DiT's self-attention) uses the self-attention backend when one is set."""
    if self_attention and _self_active is not None:
        return _self_active[1](q, k, v)
    if _active is None:
        set_backend("auto", q.device)
    return _active[1](q, k, v)
