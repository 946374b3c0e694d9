"""8-bit self-attention for Hopper (lossy, opt-in): SageAttention-style math, written from the formulas.

    out = softmax(q k^T / sqrt(D)) v,  q [B, Lq, H, D], k/v [B, Lk, H, D] bf16 -> [B, Lq, H, D] bf16

Math (``attn8`` runs it in Triton, ``attn8_reference`` in torch, the same steps in the same order):

1. K smoothing: ``k -= mean over tokens of k`` per (batch, head). Every score of a query row moves by the
   same ``q . mean``, which softmax ignores; what is left is centred, so 8 bits cover it better (Wan's K
   has a large common component).
2. Q and K quantised per block of ``SCALE_BLOCK`` = 64 tokens per (batch, head): ``scale = amax / QMAX``
   (FP8 e4m3: 448, INT8: 127), ``x8 = x / scale`` (INT8: rounded half up, ``floor(x + 0.5)``). The query
   scale also carries ``log2(e) / sqrt(D)``, so scores come out in the base-2 domain of ``exp2``.
3. S = dot(q8, k8) (FP8 -> fp32 or INT8 -> int32 on the tensor cores) times the two block scales.
4. Online softmax over key blocks of ``BLOCK_N`` in fp32: running max m, ``p = exp2(s - m)``, row sum
   ``l`` of the fp32 p, accumulator rescaled by ``exp2(m_old - m_new)``. Keys past Lk are masked (-inf).
5. PV: ``pv="fp8"``: p is quantised as ``fp8(p * 448)`` (p <= 1: a fixed scale), v per (batch, head,
   channel) as ``fp8(v / (amax_tokens|v| / 448))``; the fp32 accumulator is ``sum fp8(p) fp8(v)`` and
   the output ``acc * vscale / 448 / l``. ``pv="bf16"``: ``dot(bf16(p), v)``, output ``acc / l``.

Speed: FP8 / INT8 wgmma runs at twice the bf16 rate on Hopper, so with ``pv="fp8"`` both GEMMs are
8-bit. FP8 wgmma wants both operands K-major; for PV the reduction axis is the token, so the pre-pass
writes V8 transposed, [B, H, D, Lk_pad] (tokens contiguous; padded with zeros to a multiple of 128 so the
main loop never masks V). Q8 and K8 keep the input layout [B, L, H, D] (a 128-byte row per token/head).

The reference loops over key blocks exactly as the kernel does (P is quantised relative to the running
max, not the final one), so kernel and reference differ only by fp32 summation order and exp2 rounding.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

try:  # the kernel needs Triton (CUDA, or its CPU interpreter in tests); the reference does not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

SCALE_BLOCK = 64  # tokens per Q / K quantisation scale (independent of the kernel's tile sizes)
V_PAD = 128  # V8 token axis padded to a multiple of this (>= every BLOCK_N)
QMAX = {"fp8": 448.0, "int8": 127.0}  # largest e4m3fn finite value, largest int8 magnitude
P_SCALE = 448.0  # p in [0, 1] -> p * 448 fills e4m3's range
LOG2E = 1.4426950408889634
_EPS = 1e-12  # amax floor: an all-zero block quantises to zeros instead of 0/0
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton's CPU interpreter (tests)
# pv="fp32" keeps p and v in fp32 (ieee dot): no speed-up, it exists to check the rest of the kernel
# against the reference's pv="none" in Triton's CPU interpreter
QK_MODES, PV_MODES = ("fp8", "int8"), ("fp8", "bf16", "fp32")


# ----------------------------------------------------------------------------------------------------
# Reference (pure torch): the same quantisation math, for CPU tests and error studies
# ----------------------------------------------------------------------------------------------------


def _round8(x: Tensor, mode: str) -> Tensor:
    """x already divided by its scale and clamped to +-QMAX -> the 8-bit value, returned as float32."""
    if mode == "fp8":
        return x.to(torch.float8_e4m3fn).float()
    return torch.floor(x + 0.5).to(torch.int8).float()


def quantize_blocks_reference(x: Tensor, mode: str, mult: float = 1.0, mean: Tensor | None = None):
    """x [B, L, H, D] -> (x8 [B, L, H, D] float32 holding 8-bit values, scale [B, H, nblk] float32).

    One scale per ``SCALE_BLOCK`` tokens per (batch, head); ``x ~= x8 * scale / mult``. ``mean`` [B, H, D]
    is subtracted first (K smoothing). ``mode="none"``: no rounding, scale = mult (the exact path)."""
    B, L, H, D = x.shape
    xf = x.float() if mean is None else x.float() - mean[:, None].float()
    if mode == "none":
        return xf, torch.full((B, H, -(-L // SCALE_BLOCK)), mult, dtype=torch.float32, device=x.device)
    nblk = -(-L // SCALE_BLOCK)
    padded = torch.nn.functional.pad(xf, (0, 0, 0, 0, 0, nblk * SCALE_BLOCK - L))  # zeros past L
    amax = padded.unflatten(1, (nblk, SCALE_BLOCK)).abs().amax(dim=(2, 4))  # [B, nblk, H]
    scale = amax.clamp(min=_EPS) / QMAX[mode]
    per_row = scale.repeat_interleave(SCALE_BLOCK, dim=1)[:, :L, :, None]  # [B, L, H, 1]
    x8 = _round8((xf / per_row).clamp(-QMAX[mode], QMAX[mode]), mode)
    return x8, (scale * mult).permute(0, 2, 1).contiguous()


def quantize_v_reference(v: Tensor) -> tuple[Tensor, Tensor]:
    """v [B, L, H, D] -> (v8 [B, L, H, D] float32 holding e4m3 values, scale [B, H, D] float32)."""
    vf = v.float()
    scale = vf.abs().amax(dim=1).clamp(min=_EPS) / QMAX["fp8"]  # [B, H, D]
    return _round8((vf / scale[:, None]).clamp(-448.0, 448.0), "fp8"), scale


def attn8_reference(
    q: Tensor, k: Tensor, v: Tensor, qk: str = "fp8", pv: str = "fp8", block_n: int = 64
) -> Tensor:
    """The kernel's math in torch float32. qk: "fp8" | "int8" | "none"; pv: "fp8" | "bf16" | "none".

    "none" skips that rounding (Q/K, resp. P/V stay float32): qk="none", pv="none" is exact attention
    up to fp32 rounding, which checks the smoothing / scale / online-softmax algebra on its own.
    q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    q8, qs = quantize_blocks_reference(q, qk, LOG2E / math.sqrt(D))  # scores in log2 units
    k8, ks = quantize_blocks_reference(k, qk, 1.0, mean=k.float().mean(dim=1))
    qs = qs.repeat_interleave(SCALE_BLOCK, dim=2)[:, :, :Lq, None]  # [B, H, Lq, 1]
    ks = ks.repeat_interleave(SCALE_BLOCK, dim=2)[:, :, None, :Lk]  # [B, H, 1, Lk]
    q8, k8 = q8.transpose(1, 2), k8.transpose(1, 2)  # [B, H, L, D]
    if pv == "fp8":
        v8, vs = quantize_v_reference(v)
        v8 = v8.transpose(1, 2)
    else:
        v8 = (v.to(torch.bfloat16) if pv == "bf16" else v).float().transpose(1, 2)
    m = torch.full((B, H, Lq, 1), -math.inf, device=q.device)
    lsum = torch.zeros(B, H, Lq, 1, device=q.device)
    acc = torch.zeros(B, H, Lq, D, device=q.device)
    for start in range(0, Lk, block_n):
        sl = slice(start, min(start + block_n, Lk))
        s = (q8 @ k8[:, :, sl].transpose(-1, -2)) * qs * ks[..., sl]  # [B, H, Lq, n]
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        alpha, p = torch.exp2(m - m_new), torch.exp2(s - m_new)
        lsum = lsum * alpha + p.sum(-1, keepdim=True)
        if pv == "fp8":
            p = (p * P_SCALE).to(torch.float8_e4m3fn).float()
        elif pv == "bf16":
            p = p.to(torch.bfloat16).float()
        acc = acc * alpha + p @ v8[:, :, sl]
        m = m_new
    if pv == "fp8":
        acc = acc * (vs[:, :, None] / P_SCALE)
    return (acc / lsum).transpose(1, 2).to(q.dtype)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages). Small on purpose: autotuning at 75,600 tokens compiles and
# times each once (~8 x a few seconds). BLOCK_M=128 with 4 warps would hold a 128x128 fp32 accumulator
# plus a 128xBLOCK_N score tile in 128 threads: spills, so 128-row tiles get 8 warps (or BLOCK_N=64).
CONFIGS = [
    (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4),
    (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4),
]  # fmt: skip

if triton is not None:

    @triton.jit
    def _quant_qk_kernel(X, MEAN, X8, S, L, H, sxb, sxl, sxh, s8b, s8l, s8h, nblk, mult,
                         D: tl.constexpr, BLK: tl.constexpr, SUB_MEAN: tl.constexpr,
                         INT8: tl.constexpr):  # fmt: skip
        # one program: BLK tokens of one (batch, head). X [B, L, H, D] (any strides) -> X8 (same shape),
        # S [B, H, nblk] = amax / QMAX * mult
        blk, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        rows = blk * BLK + tl.arange(0, BLK)
        d = tl.arange(0, D)
        inside = rows[:, None] < L
        x = tl.load(
            X + b.to(tl.int64) * sxb + h * sxh + rows[:, None] * sxl + d[None, :], mask=inside, other=0.0
        )
        x = x.to(tl.float32)
        if SUB_MEAN:  # K smoothing; padded rows stay 0 so they do not enter amax
            x = tl.where(inside, x - tl.load(MEAN + bh * D + d)[None, :], 0.0)
        qmax = 127.0 if INT8 else 448.0
        scale = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 1e-12) / qmax
        y = tl.minimum(tl.maximum(x / scale, -qmax), qmax)
        dst = X8 + b.to(tl.int64) * s8b + h * s8h + rows[:, None] * s8l + d[None, :]
        if INT8:
            tl.store(dst, tl.floor(y + 0.5).to(tl.int8), mask=inside)
        else:
            tl.store(dst, y.to(tl.float8e4nv), mask=inside)
        tl.store(S + bh * nblk + blk, scale * mult)

    @triton.jit
    def _quant_v_kernel(V, VS, V8T, L, H, svb, svl, svh, LP, D: tl.constexpr, BLK: tl.constexpr):
        # one program: BLK tokens of one (batch, head). V [B, L, H, D], VS [B, H, D] (amax / 448)
        # -> V8T [B, H, D, LP] e4m3, tokens contiguous, zeros past L
        blk, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        rows = blk * BLK + tl.arange(0, BLK)
        d = tl.arange(0, D)
        v = tl.load(V + b.to(tl.int64) * svb + h * svh + rows[None, :] * svl + d[:, None],
                    mask=rows[None, :] < L, other=0.0).to(tl.float32)  # [D, BLK]  # fmt: skip
        y = tl.minimum(tl.maximum(v / tl.load(VS + bh * D + d)[:, None], -448.0), 448.0)
        tl.store(V8T + bh.to(tl.int64) * D * LP + d[:, None] * LP + rows[None, :], y.to(tl.float8e4nv))

    @triton.jit
    def _attn_block(acc, m_i, l_i, q, qs, K8, KS, V, start, kbase, vbase, Lk, skl, svl, svd,
                    offs_n, d, BLOCK_N: tl.constexpr, SBLK: tl.constexpr, INT8: tl.constexpr,
                    PV_FP8: tl.constexpr, PV_FP32: tl.constexpr, MASK: tl.constexpr):  # fmt: skip
        # one key block [start, start + BLOCK_N) of the online softmax; returns the updated (acc, m, l)
        n = start + offs_n
        if MASK:
            k = tl.load(K8 + kbase + n[None, :] * skl + d[:, None], mask=n[None, :] < Lk, other=0.0)
            ks = tl.load(KS + n // SBLK, mask=n < Lk, other=0.0)
        else:
            k = tl.load(K8 + kbase + n[None, :] * skl + d[:, None])  # [D, BLOCK_N]
            ks = tl.load(KS + n // SBLK)
        if INT8:
            s = tl.dot(q, k, out_dtype=tl.int32).to(tl.float32)
        else:
            s = tl.dot(q, k)
        s = s * qs[:, None] * ks[None, :]  # [BLOCK_M, BLOCK_N], log2 units
        if MASK:
            s = tl.where(n[None, :] < Lk, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if PV_FP8:  # V8T is padded with zeros: no mask
            vt = tl.load(V + vbase + d[:, None] * svd + n[None, :])  # [D, BLOCK_N], tokens contiguous
            pv = tl.dot((p * 448.0).to(tl.float8e4nv), tl.trans(vt))
        else:
            if MASK:
                v = tl.load(V + vbase + n[:, None] * svl + d[None, :], mask=n[:, None] < Lk, other=0.0)
            else:
                v = tl.load(V + vbase + n[:, None] * svl + d[None, :])  # [BLOCK_N, D]
            if PV_FP32:  # checking only: fp32 p and v (the CPU interpreter's bf16 / fp8 math is wrong)
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(tl.bfloat16), v)
        # a fresh dot then an fp32 add: the running sum is not left in the FP8 MMA's reduced-precision
        # accumulator across blocks
        return acc * alpha[:, None] + pv, m_new, l_i

    @triton.jit
    def _attn8_kernel(Q8, K8, V, QS, KS, VS, Out, Lq, Lk, H, nqb, nkb,
                      sqb, sql, sqh, skb, skl, skh, svb, svh, svl, svd, sob, sol, soh,
                      D: tl.constexpr, SBLK: tl.constexpr, INT8: tl.constexpr, PV_FP8: tl.constexpr, PV_FP32: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
        # grid (cdiv(Lq, BLOCK_M), B * H): neighbouring programs share one head's K/V (L2 reuse).
        # V: PV_FP8: V8T [B, H, D, Lk_pad] (svl unused); else v [B, Lk, H, D] bf16 (svd unused).
        mb, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        q = tl.load(Q8 + b.to(tl.int64) * sqb + h * sqh + rows[:, None] * sql + d[None, :],
                    mask=rows[:, None] < Lq, other=0.0)  # fmt: skip
        qs = tl.load(QS + bh * nqb + rows // SBLK, mask=rows < Lq, other=0.0)  # incl. log2(e)/sqrt(D)
        kbase = b.to(tl.int64) * skb + h * skh
        vbase = b.to(tl.int64) * svb + h * svh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        KSb = KS + bh * nkb
        full = (Lk // BLOCK_N) * BLOCK_N
        if INTERPRET:  # the CPU interpreter cannot range() over a runtime bound (numpy >= 2.3): a while
            start = 0
            while start < full:
                acc, m_i, l_i = _attn_block(acc, m_i, l_i, q, qs, K8, KSb, V, start, kbase, vbase, Lk, skl,
                                            svl, svd, offs_n, d, BLOCK_N, SBLK, INT8, PV_FP8, PV_FP32, False)  # fmt: skip
                start += BLOCK_N
        else:  # a for loop: what Triton software-pipelines (num_stages)
            for start in range(0, full, BLOCK_N):
                acc, m_i, l_i = _attn_block(acc, m_i, l_i, q, qs, K8, KSb, V, start, kbase, vbase, Lk, skl,
                                            svl, svd, offs_n, d, BLOCK_N, SBLK, INT8, PV_FP8, PV_FP32, False)  # fmt: skip
        if full < Lk:  # the tail block, masked
            acc, m_i, l_i = _attn_block(acc, m_i, l_i, q, qs, K8, KSb, V, full, kbase, vbase, Lk, skl,
                                        svl, svd, offs_n, d, BLOCK_N, SBLK, INT8, PV_FP8, PV_FP32, True)  # fmt: skip
        if PV_FP8:
            acc = acc * (tl.load(VS + bh * D + d) / 448.0)[None, :]
        out = acc / l_i[:, None]
        tl.store(Out + b.to(tl.int64) * sob + h * soh + rows[:, None] * sol + d[None, :],
                 out.to(Out.dtype.element_ty), mask=rows[:, None] < Lq)  # fmt: skip

    _attn8_autotuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in CONFIGS
        ],
        key=["Lq", "Lk", "H", "D", "INT8", "PV_FP8", "PV_FP32"],
    )(_attn8_kernel)


# ----------------------------------------------------------------------------------------------------
# Python entry points
# ----------------------------------------------------------------------------------------------------


def quantize(q: Tensor, k: Tensor, v: Tensor, qk: str = "fp8", pv: str = "fp8"):
    """The pre-pass: q, k [B, L, H, D] -> (q8, qs, k8, ks, v_in, vs).

    q8 / k8 [B, L, H, D] e4m3 or int8 (k smoothed), qs / ks [B, H, cdiv(L, 64)] float32 (qs includes
    log2(e) / sqrt(D)); pv="fp8": v_in = V8T [B, H, D, Lk_pad] e4m3 and vs [B, H, D] float32 (amax / 448);
    pv="bf16" / "fp32": v_in = v itself (strided, no copy) and vs = None."""
    if qk not in QK_MODES or pv not in PV_MODES:
        raise ValueError(f"qk must be one of {QK_MODES} and pv one of {PV_MODES}, got {qk!r}, {pv!r}")
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    dt = torch.int8 if qk == "int8" else torch.float8_e4m3fn
    out = []
    for x, mult, mean in (
        (q, LOG2E / math.sqrt(D), None),
        (k, 1.0, k.mean(dim=1, dtype=torch.float32).contiguous()),  # [B, H, D], no fp32 copy of k
    ):
        L = x.shape[1]
        nblk = triton.cdiv(L, SCALE_BLOCK)
        x8 = torch.empty(B, L, H, D, dtype=dt, device=x.device)
        s = torch.empty(B, H, nblk, dtype=torch.float32, device=x.device)
        _quant_qk_kernel[(nblk, B * H)](
            x, x if mean is None else mean, x8, s, L, H, x.stride(0), x.stride(1), x.stride(2),
            x8.stride(0), x8.stride(1), x8.stride(2), nblk, mult,
            D=D, BLK=SCALE_BLOCK, SUB_MEAN=mean is not None, INT8=qk == "int8", num_warps=4,
        )  # fmt: skip
        out += [x8, s]
    if pv != "fp8":
        return (*out, v, None)
    # per-channel amax over tokens without an |v| temporary: max(amax, -amin), [B, H, D]
    vs = (torch.maximum(v.amax(dim=1), -v.amin(dim=1)).float().clamp(min=_EPS) / 448.0).contiguous()
    lp = triton.cdiv(Lk, V_PAD) * V_PAD
    v8t = torch.empty(B, H, D, lp, dtype=torch.float8_e4m3fn, device=v.device)
    _quant_v_kernel[(lp // SCALE_BLOCK, B * H)](
        v, vs, v8t, Lk, H, v.stride(0), v.stride(1), v.stride(2), lp, D=D, BLK=SCALE_BLOCK, num_warps=4
    )
    return (*out, v8t, vs)


def attn8(
    q: Tensor, k: Tensor, v: Tensor, qk: str = "fp8", pv: str = "fp8", config: tuple | None = None
) -> Tensor:
    """8-bit attention, no mask, scale 1/sqrt(D). q [B, Lq, H, D], k/v [B, Lk, H, D] bf16 (any strides
    with a contiguous last dim) -> [B, Lq, H, D] bf16. ``config``: (BLOCK_M, BLOCK_N, num_warps,
    num_stages) to skip autotuning (tests, the interpreter); None: autotuned per shape over ``CONFIGS``."""
    if triton is None:
        raise RuntimeError("attn8 needs Triton")
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if D not in (64, 128) or k.shape != (B, Lk, H, D) or v.shape != k.shape:
        raise ValueError(
            f"attn8: head dim 64 or 128 and k/v of one shape; got {q.shape}, {k.shape}, {v.shape}"
        )
    if any(x.stride(-1) != 1 for x in (q, k, v)):
        q, k, v = (x.contiguous() for x in (q, k, v))
    q8, qs, k8, ks, v_in, vs = quantize(q, k, v, qk, pv)
    o = torch.empty(B, Lq, H, D, dtype=q.dtype, device=q.device)
    if pv == "fp8":  # V8T [B, H, D, Lp]: (batch, head, channel) strides; the token stride is 1
        vstr = (v_in.stride(0), v_in.stride(1), 0, v_in.stride(2))
    else:  # v [B, L, H, D]
        vstr = (v_in.stride(0), v_in.stride(2), v_in.stride(1), 0)
    args = (q8, k8, v_in, qs, ks, vs if vs is not None else qs, o, Lq, Lk, H, qs.shape[-1], ks.shape[-1],
            q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1), k8.stride(2), *vstr,
            o.stride(0), o.stride(1), o.stride(2))  # fmt: skip
    meta = {"D": D, "SBLK": SCALE_BLOCK, "INT8": qk == "int8", "PV_FP8": pv == "fp8", "PV_FP32": pv == "fp32",
            "INTERPRET": _INTERPRET}  # fmt: skip
    if config is None:
        grid = lambda c: (triton.cdiv(Lq, c["BLOCK_M"]), B * H)  # noqa: E731
        _attn8_autotuned[grid](*args, **meta)
    else:
        bm, bn, warps, stages = config
        _attn8_kernel[(triton.cdiv(Lq, bm), B * H)](
            *args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages
        )
    return o


def chosen_config(qk: str = "fp8", pv: str = "fp8") -> dict:
    """The autotuner's choices so far, {key: config string} (for the benchmark's JSON)."""
    if triton is None:
        return {}
    return {str(k): str(c) for k, c in _attn8_autotuned.cache.items()}
