"""FP8 (e4m3) linear layers for the DiT: lossy, opt-in (``EngineSettings.quant == "fp8"``).

Scheme (per-row activations x per-output-channel weights, both symmetric, no zero point):
- weight [out, in] -> ``qweight`` float8_e4m3fn [out, in] and ``scale`` float32 [out], with
  ``weight ~= qweight * scale[:, None]``; the bf16 weight is dropped, so the layer's memory halves;
- activation x [..., in] -> rows [R, in]; each row scaled by its own amax / 448 (e4m3's largest finite
  value) on every call, so no calibration is needed and an outlier only costs its own row precision;
- GEMM: ``torch._scaled_mm`` (FP8 tensor cores, fp32 accumulation, row-wise scales applied in the
  epilogue) on CUDA devices of compute capability >= 8.9; elsewhere a dequantised reference computing
  the same quantised math in float32.

Per-output-channel scales make quantisation commute with row-wise concatenation, so quantising a fused
QKV weight equals concatenating the quantised Q, K, V (the FP8 checkpoint relies on it).

``Policy`` says what stays bf16. Only ``nn.Linear`` layers inside ``dit.blocks`` are ever eligible: the
patch / text / time embeddings, the time projection and the head are outside the blocks and always
stay bf16 (their cost is negligible and they set the scale of everything downstream); norms and
modulation tables are not Linears. ``DEFAULT_POLICY`` adds the blocks and linear types that
``benchmarks/fp8_gpu.py``'s per-layer error study found to hurt most.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# the e4m3 row quantisation (torch ops) and its one-pass kernel live with the kernel
from wanfast.kernels.rowquant import FP8, quantize_rows, rowquant

# Linear types of a block, named as the error study and ``Policy.keep_types`` name them. Fused and
# unfused names map to the same type, so a policy reads the same before and after fusion.
LINEAR_TYPES = {
    "self_attn.q": "self_attn.qkv", "self_attn.k": "self_attn.qkv", "self_attn.v": "self_attn.qkv",
    "self_attn.wqkv": "self_attn.qkv", "self_attn.o": "self_attn.o",
    "cross_attn.q": "cross_attn.q", "cross_attn.k": "cross_attn.kv", "cross_attn.v": "cross_attn.kv",
    "cross_attn.wkv": "cross_attn.kv", "cross_attn.o": "cross_attn.o",
    "ffn.0": "ffn.0", "ffn.2": "ffn.2",
}  # fmt: skip
_BLOCK_LINEAR = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _scaled_mm_capable(device: torch.device) -> bool:
    """FP8 tensor-core GEMMs need compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class FP8Linear(nn.Module):
    """``nn.Linear`` with an FP8 e4m3 weight and per-row FP8 activations. Output in ``compute_dtype``.

    ``weight`` is kept as an attribute for the callers that read ``layer.weight.dtype`` to cast their
    input (the DiT code does): it is an empty tensor of the compute dtype, not the weights.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype,
                 device: torch.device | str | None = None):  # fmt: skip
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None  # fmt: skip
        self.register_buffer("weight", torch.empty(0, dtype=compute_dtype, device=device), persistent=False)
        # Decided once, not per call: a capability query inside forward would break compiled graphs.
        self.use_scaled_mm = device is not None and _scaled_mm_capable(torch.device(device))
        # How the input rows are quantised: None = torch ops (compile fuses them into what produced x);
        # "rows" / "gelu_rows" = kernels.rowquant's one-pass kernel, the latter with GELU-tanh applied to x
        # first (``use_row_kernels`` moves the FFN's GELU into ffn.2 this way).
        self.input_kernel: str | None = None

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda(): re-decide the GEMM path for the new device of the weights.
        module = super()._apply(fn, recurse)
        self.use_scaled_mm = not self.qweight.is_meta and _scaled_mm_capable(self.qweight.device)
        return module

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        """Quantise ``linear`` (weight [out, in]) per output channel; the result lives on its device."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        qweight, scale = quantize_rows(w)  # [out, in], [out, 1]
        layer.qweight.copy_(qweight)
        layer.scale.copy_(scale[:, 0])
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    def extra_repr(self) -> str:
        kernel = f", input {self.input_kernel}" if self.input_kernel else ""
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, fp8 e4m3{kernel}"
        )

    def forward(self, x: Tensor) -> Tensor:
        # x [..., in] -> [..., out] in compute_dtype; rows = prod(...)
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if self.input_kernel is None:
            x8, sx = quantize_rows(rows)  # [R, in] fp8, [R, 1] fp32
        else:
            x8, sx = rowquant(rows, self.input_kernel == "gelu_rows")
        if self.use_scaled_mm and x.is_cuda:
            # qweight.t() is the column-major [in, out] operand cuBLASLt's FP8 GEMM wants, at no copy.
            y = torch._scaled_mm(x8, self.qweight.t(), scale_a=sx, scale_b=self.scale[None, :],
                                 bias=self.bias, out_dtype=self.compute_dtype)  # fmt: skip
        else:
            y = self.reference(x8, sx).to(self.compute_dtype)
        return y.reshape(*lead, self.out_features)

    def reference(self, x8: Tensor, sx: Tensor) -> Tensor:
        """Dequantised float32 math of the FP8 GEMM: (x8 * sx) @ (qweight * scale)^T + bias, [R, out]."""
        w = self.qweight.float() * self.scale[:, None]
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x8.float() * sx, w, bias)

    def dequantized_weight(self) -> Tensor:
        """[out, in] float32: what the FP8 weight stands for (for error studies)."""
        return self.qweight.float() * self.scale[:, None]


@dataclass(frozen=True)
class Policy:
    """What stays bf16. Linears outside ``dit.blocks`` (embeddings, time projection, head) always do.

    keep_blocks: block indices kept entirely bf16; keep_types: linear types (``LINEAR_TYPES`` values,
    e.g. "cross_attn.kv") kept bf16 in every block.
    """

    keep_blocks: tuple[int, ...] = ()
    keep_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.keep_types) - set(LINEAR_TYPES.values())
        if unknown:
            raise ValueError(
                f"unknown linear types {sorted(unknown)}; known: {sorted(set(LINEAR_TYPES.values()))}"
            )

    def quantizes(self, name: str) -> bool:
        """Whether the Linear at module path ``name`` (e.g. "blocks.3.self_attn.wqkv") becomes FP8."""
        m = _BLOCK_LINEAR.match(name)
        if m is None or m.group(2) not in LINEAR_TYPES:
            return False
        return int(m.group(1)) not in self.keep_blocks and LINEAR_TYPES[m.group(2)] not in self.keep_types

    def to_json(self) -> dict:
        return {"keep_blocks": list(self.keep_blocks), "keep_types": list(self.keep_types)}

    @classmethod
    def from_json(cls, d: dict) -> Policy:
        return cls(tuple(int(b) for b in d.get("keep_blocks", ())), tuple(d.get("keep_types", ())))


# From the random-weight error study at A14B dims (benchmarks/fp8_gpu.py, H200, 2026-11-23): all block
# linears FP8 -> DiT output rel err 0.046; one block alone 0.006-0.009 (no block near the 0.25 x 0.046
# threshold: early blocks only slightly worse); by type cross_attn.o 0.030, cross_attn.kv 0.022, self_attn.o
# 0.017, ffn.0 / ffn.2 0.014, self_attn.qkv 0.011, cross_attn.q 0.005. Keeping the worst types bf16 would
# cost memory (cross-attn kv + o: +3.1 GB, over the 15.5 GB budget) for a 10-step video already at 36 dB
# PSNR, so only the parts outside the blocks stay bf16.
DEFAULT_POLICY = Policy()


def quantize_dit_(dit: nn.Module, policy: Policy = DEFAULT_POLICY) -> nn.Module:
    """Replace every Linear of ``dit`` that ``policy`` quantises (plain or fused) by an ``FP8Linear``, in
    place, one at a time, so the peak memory grows by one layer's FP8 copy at most. Returns ``dit``."""
    targets = [
        name for name, m in dit.named_modules() if type(m) is nn.Linear and policy.quantizes(name)
    ]  # fmt: skip
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = dit.get_submodule(parent_name)
        setattr(parent, child, FP8Linear.from_linear(getattr(parent, child)))  # drops the bf16 Linear
    return dit


def fp8_modules(dit: nn.Module) -> dict[str, FP8Linear]:
    return {name: m for name, m in dit.named_modules() if isinstance(m, FP8Linear)}


def use_fp8_gemm(dit: nn.Module, device: torch.device) -> int:
    """Choose the FP8 GEMM path for the device the DiT will *run* on. Offload modes build (and quantise)
    experts on the CPU and move weight storage to the GPU per block or per expert without ``.to()``, so
    the choice made at construction (CPU: the dequantised reference) would otherwise stick."""
    layers, capable = fp8_modules(dit).values(), _scaled_mm_capable(device)
    for layer in layers:
        layer.use_scaled_mm = capable
    return len(layers)


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of parameters and persistent buffers (what a checkpoint of ``module`` holds)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def apply_quant(dit: nn.Module, mode: str, policy: Policy = DEFAULT_POLICY) -> int:
    """``optimize_dit``'s entry: quantise ``dit`` as ``EngineSettings.quant`` says; returns the number of
    FP8 linears it then has (layers already FP8, e.g. from an FP8 checkpoint, are kept as they are)."""
    if mode != "fp8":
        raise ValueError(f"unknown quant mode {mode!r}; supported: 'fp8'")
    quantize_dit_(dit, policy)
    return len(fp8_modules(dit))


def use_row_kernels(dit: nn.Module) -> int:
    """Let the FP8 linears whose input comes from an opaque kernel quantise it with ``kernels.rowquant``
    (one read of x instead of inductor's reduce-then-rewrite loops; see that module): each block's
    ``ffn.2``, which also takes over the FFN's GELU-tanh (``ffn.1`` becomes Identity: the kernel reads
    ``ffn.0``'s pre-activation output), and the attention output projections ``self_attn.o`` /
    ``cross_attn.o`` (their input is the attention kernel's output). Same math as the torch ops up to
    GELU rounding (one bf16 ulp in a few elements). Returns how many linears changed."""
    n = 0
    for block in getattr(dit, "blocks", ()):
        ffn = block.ffn
        if isinstance(ffn[2], FP8Linear) and isinstance(ffn[1], nn.GELU) and ffn[1].approximate == "tanh":
            ffn[2].input_kernel, ffn[1] = "gelu_rows", nn.Identity()
            n += 1
        for attn in (block.self_attn, block.cross_attn):
            if isinstance(attn.o, FP8Linear):
                attn.o.input_kernel = "rows"
                n += 1
    return n
