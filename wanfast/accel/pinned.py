"""Host copies of a module's weights in one flat CPU buffer, pinned once with ``cudaHostRegister``.

Why not ``Tensor.pin_memory()`` per tensor: PyTorch's caching host allocator rounds every pinned allocation
up to a power of two, so an A14B expert's 28.6 GB of weights (linears of 52-157 MB each) took ~44 GB of
pinned memory. With both experts offloaded and the T5 encoder on the CPU, a 1280x720 `--memory-budget 48`
run was killed by the host's out-of-memory killer on a 128 GiB machine (2026-11-23, nvidia-h200 machine:
anonymous 41.6 GB + pinned 87.8 GB resident). One buffer per module, registered as a whole, costs the
weights' bytes plus at most ``ALIGN`` bytes per tensor.

``HostBuffer.adopt`` copies tensor by tensor and points each tensor at its host view at once, so the
original (device or pageable CPU) storage is freed as the copy goes: the transient extra is one tensor,
not one expert.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import Tensor

from wanfast.config import ConfigError

log = logging.getLogger(__name__)

ALIGN = 512  # bytes; every view starts at a multiple (DMA-friendly, and a multiple of any element size)


def span_elements(t: Tensor) -> int:
    """Elements of storage a tensor's strides reach (its numel when contiguous)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))


def layout(tensors: list[Tensor]) -> tuple[list[int], int]:
    """Byte offset of each tensor in the flat buffer, and the buffer's size."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-span_elements(t) * t.element_size() // ALIGN) * ALIGN
    return offsets, total


def available_host_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """The kernel's estimate of RAM available without swapping (Linux ``MemAvailable``); None elsewhere."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_host_room(need: int, what: str, meminfo: str = "/proc/meminfo") -> None:
    """Raise ``ConfigError`` before copying ``need`` bytes to host memory that the host does not have."""
    avail = available_host_bytes(meminfo)
    if avail is not None and need > avail:
        raise ConfigError(
            f"{what} keeps {need / 2**30:.1f} GiB of weights in host memory, but only {avail / 2**30:.1f} GiB "
            "of RAM is available: use --quant fp8 (half the bytes), free host memory, or a larger GPU "
            "(the resident mode needs no host copies)"
        )


def register(buffer: Tensor) -> None:
    """Page-lock ``buffer``'s memory for async, full-speed copies (``cudaHostRegisterPortable``)."""
    err = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 1))
    if err != 0:
        raise RuntimeError(
            f"cudaHostRegister of {buffer.numel() / 2**30:.1f} GiB failed (cudaError {err}): the host cannot "
            "page-lock that much memory; free host RAM or use --quant fp8 (half the bytes)"
        )


def unregister(ptr: int) -> None:
    """Undo ``register``; the memory stays valid (pageable). Errors are logged: at interpreter exit the CUDA
    context may already be gone, which leaves nothing to undo."""
    try:
        err = int(torch.cuda.cudart().cudaHostUnregister(ptr))
    except Exception as e:  # noqa: BLE001 - torch half torn down at exit
        err = repr(e)
    if err != 0:
        log.debug("cudaHostUnregister(%#x) failed: %s", ptr, err)


class HostBuffer:
    """One flat CPU buffer holding a view per tensor (same dtype, shape and strides); pinned when asked,
    and unpinned when this object is collected."""

    def __init__(self, tensors: list[Tensor], pin: bool) -> None:
        offsets, total = layout(tensors)
        raw = torch.empty(total + ALIGN, dtype=torch.uint8)  # CPU allocations are only 64-byte aligned
        start = -raw.data_ptr() % ALIGN
        self.buffer = raw[start : start + total]
        self.nbytes = total
        self.pinned = pin and total > 0
        if self.pinned:
            register(self.buffer)
            weakref.finalize(self, unregister, self.buffer.data_ptr())
        self.views = [self._view(off, t) for off, t in zip(offsets, tensors, strict=True)]

    def _view(self, offset: int, t: Tensor) -> Tensor:
        raw = self.buffer[offset : offset + span_elements(t) * t.element_size()]
        return raw.view(t.dtype).as_strided(t.shape, t.stride())

    @torch.no_grad()
    def adopt(self, tensors: list[Tensor]) -> list[Tensor]:
        """Copy each tensor into its view and point it there (freeing its old storage if unshared)."""
        for t, h in zip(tensors, self.views, strict=True):
            h.copy_(t.detach())
            t.data = h
        return self.views
