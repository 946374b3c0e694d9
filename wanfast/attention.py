"""One ``attention(q, k, v)`` entry point with a registry of backends.

The backend is resolved once (``set_backend`` at start-up, or lazily on first call), logged, and then
used for every call. All backends take and return ``[B, L, H, D]`` tensors (the layout the DiT produces
after its projections), so models never see backend-specific layouts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("wanfast.attention")

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # SDPA wants [B, H, L, D]; transposes are views, SDPA handles the strides.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _sdpa_with(backend: torch.nn.attention.SDPBackend) -> AttentionFn:
    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with torch.nn.attention.sdpa_kernel(backend):
            return _sdpa(q, k, v)

    return fn


def _cudnn_available() -> bool:
    return torch.cuda.is_available() and torch.backends.cudnn.is_available()


# name -> (factory, availability check). Factories are called once, when the backend is chosen.
_REGISTRY: dict[str, tuple[Callable[[], AttentionFn], Callable[[], bool]]] = {
    "sdpa": (lambda: _sdpa, lambda: True),
    "sdpa-cudnn": (lambda: _sdpa_with(torch.nn.attention.SDPBackend.CUDNN_ATTENTION), _cudnn_available),
    "sdpa-flash": (
        lambda: _sdpa_with(torch.nn.attention.SDPBackend.FLASH_ATTENTION),
        torch.cuda.is_available,
    ),
    "sdpa-math": (lambda: _sdpa_with(torch.nn.attention.SDPBackend.MATH), lambda: True),
}

# Preference for "auto" on CUDA: cuDNN measured fastest on the H200 (see BENCHMARKS.md).
_AUTO_ORDER_CUDA = ("sdpa-cudnn", "sdpa")

_active: tuple[str, AttentionFn] | None = None


def register_backend(name: str, factory: Callable[[], AttentionFn], available: Callable[[], bool]) -> None:
    _REGISTRY[name] = (factory, available)


def available_backends() -> list[str]:
    return [name for name, (_, ok) in _REGISTRY.items() if ok()]


def set_backend(name: str = "auto", device: str | torch.device | None = None) -> str:
    """Choose the backend once for this process; returns the resolved name."""
    global _active
    if name == "auto":
        is_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        order = _AUTO_ORDER_CUDA if is_cuda else ("sdpa",)
        name = next(n for n in order if _REGISTRY[n][1]())
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; registered: {', '.join(_REGISTRY)}")
    factory, ok = _REGISTRY[name]
    if not ok():
        raise RuntimeError(
            f"attention backend {name!r} is not available here; available: {available_backends()}"
        )
    _active = (name, factory())
    log.info("attention backend: %s", name)
    return name


def active_backend() -> str | None:
    return _active[0] if _active else None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention, no mask, scale 1/sqrt(D). q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]."""
    if _active is None:
        set_backend("auto", q.device)
    return _active[1](q, k, v)
