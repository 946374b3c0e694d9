"""wanfast.accel.vae: the optimised decode against the plain WanVAE decode, on CPU with tiny configs.

fp32: every option combination equals the plain decode within rel err 1e-5 (only summation order and the
pre-summed sub-pixel weights differ). bf16: within 5e-2 of plain fp32 and no worse than 1.5x plain bf16's
own error (plus 5e-3). The Triton kernel runs here only in Triton's interpreter, when Triton is installed.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from dataclasses import asdict

import pytest
import torch
from helpers import randomize, rel_err

from wanfast.accel.vae import FastWanVAE, VAEDecodeOptions, optimize_vae
from wanfast.config import EngineSettings, VAEConfig
from wanfast.models.vae import CausalConv3d, WanVAE
from wanfast.specs import SPECS

CPU = EngineSettings(device="cpu")
CONFIGS = {"tiny": SPECS["tiny"].vae, "nrb2": VAEConfig(dim=8, num_res_blocks=2)}
OPTIONS = {
    "default": {},  # channels_last, causal conv, fused norm (eager on CPU) into its buffer, sub-pixel, prealloc
    "split": dict(conv2d_split=True),
    "ncdhw_split": dict(channels_last=False, conv2d_split=True),
    "plain_conv": dict(causal_conv=False, subpixel_upsample=False),  # fused norm into a new tensor
    "no_fusion": dict(fused_norm=None, prealloc_output=False),
    "all_off": asdict(VAEDecodeOptions.off()),
}


@pytest.fixture(scope="module")
def plain() -> dict[str, WanVAE]:
    torch.manual_seed(0)
    return {name: randomize(WanVAE(cfg)) for name, cfg in CONFIGS.items()}


def latents(frames: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 16, frames, 4, 6, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize(
    "cfg,opt", [("tiny", opt) for opt in OPTIONS] + [("nrb2", "default"), ("nrb2", "split")]
)
def test_fp32_matches_plain(plain, cfg, opt):
    ref = plain[cfg]
    fast = optimize_vae(copy.deepcopy(ref), CPU, **OPTIONS[opt])
    assert isinstance(fast, FastWanVAE) and fast.decode_options == VAEDecodeOptions(**{
        **asdict(VAEDecodeOptions()), **OPTIONS[opt]})  # fmt: skip
    z = latents()
    want, got = ref.decode(z), fast.decode(z)
    assert got.shape == want.shape == (1, 3, 9, 32, 48) and got.dtype == torch.float32
    assert (want.abs() < 0.99).float().mean() > 0.9  # mostly not clamped: the comparison means something
    assert rel_err(got, want) <= 1e-5


@torch.no_grad()
def test_bf16_close_to_plain(plain):
    ref = plain["nrb2"]
    z = latents(2, seed=3)
    want = ref.decode(z)
    low = copy.deepcopy(ref).to(torch.bfloat16)
    base = rel_err(low.decode(z), want)
    got = optimize_vae(low, CPU).decode(z)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    err = rel_err(got, want)
    assert 1e-5 < err <= min(5e-2, 1.5 * base + 5e-3), (err, base)


@torch.no_grad()
def test_first_frames_causal(plain):
    fast = optimize_vae(copy.deepcopy(plain["tiny"]), CPU, conv2d_split=True)
    z = latents()
    full = fast.decode(z)
    assert rel_err(fast.decode(z[:, :, :1]), full[:, :, :1]) <= 1e-5  # latent frame 0 -> video frame 0
    assert rel_err(fast.decode(z[:, :, :2]), full[:, :, :5]) <= 1e-5


@torch.no_grad()
def test_batch_of_two(plain):
    ref = plain["tiny"]
    z = torch.cat([latents(2, seed=4), latents(2, seed=5)])
    got = optimize_vae(copy.deepcopy(ref), CPU, conv2d_split=True).decode(z)  # frames views need copies
    assert rel_err(got, ref.decode(z)) <= 1e-5


def test_switch_off_leaves_module_untouched(plain):
    vae = copy.deepcopy(plain["tiny"])
    before = {k: (v.stride(), v.clone()) for k, v in vae.state_dict().items()}
    kinds = [type(m) for m in vae.modules()]
    assert optimize_vae(vae, EngineSettings(device="cpu", optimize_vae=False)) is vae
    assert type(vae) is WanVAE and [type(m) for m in vae.modules()] == kinds
    after = vae.state_dict()
    assert all(after[k].stride() == s and torch.equal(after[k], v) for k, (s, v) in before.items())


def video(frames: int = 9, seed: int = 6) -> torch.Tensor:
    return torch.rand(1, 3, frames, 32, 48, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def test_state_dict_unchanged(plain):
    ref = plain["tiny"]
    fast = optimize_vae(copy.deepcopy(ref), CPU, conv2d_split=True)
    assert optimize_vae(fast, CPU) is fast  # already optimised: left as is
    want, got = ref.state_dict(), fast.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    # Weights load into the re-laid-out parameters as usual.
    fast.load_state_dict(want)
    assert rel_err(fast.decode(latents(2)), ref.decode(latents(2))) <= 1e-5
    assert rel_err(fast.encode(video()), ref.encode(video())) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("cfg,opt", [("tiny", o) for o in ("default", "split", "ncdhw_split", "no_fusion")]
                         + [("nrb2", "default")])  # fmt: skip
def test_encode_fp32_matches_plain(plain, cfg, opt):
    """The encoder rewrite (an image + zero frames, as I2V encodes it, and a random video): the same sums
    in another order, fp32 -> rel err 1e-5, as the decode."""
    ref = plain[cfg]
    fast = optimize_vae(copy.deepcopy(ref), CPU, **OPTIONS[opt])
    assert type(fast.encoder).__name__ == "FastEncoder"
    i2v = torch.cat([video(1), torch.zeros(1, 3, 8, 32, 48)], 2)
    for x in (video(), i2v):
        want, got = ref.encode(x), fast.encode(x)
        assert got.shape == want.shape == (1, 16, 3, 4, 6) and got.dtype == torch.float32
        assert rel_err(got, want) <= 1e-5


@torch.no_grad()
def test_encoder_off_is_plain(plain):
    ref = plain["tiny"]
    fast = optimize_vae(copy.deepcopy(ref), CPU, encoder=False)
    assert type(fast.encoder.conv1) is CausalConv3d  # encode keeps the plain modules: exact
    assert torch.equal(fast.encode(video()), ref.encode(video()))


def test_bad_options_raise(plain):
    with pytest.raises(ValueError, match="fused_norm"):
        optimize_vae(copy.deepcopy(plain["tiny"]), CPU, fused_norm="cuda")
    with pytest.raises(ValueError, match="causal_conv"):
        VAEDecodeOptions(causal_conv=False, conv2d_split=True)


def test_triton_kernel_in_interpreter():
    """The fused RMSNorm + SiLU kernel, run by Triton's CPU interpreter, into a padded buffer's body."""
    # the test extra installs triton where it exists (Linux x86-64): there this runs
    pytest.importorskip("triton", reason="the test extra installs triton on Linux x86-64")

    code = textwrap.dedent("""
        import torch
        from wanfast.accel import vae as av
        from wanfast.kernels import vae_norm
        from wanfast.models.vae import RMSNorm
        cl, nc = torch.channels_last_3d, torch.contiguous_format
        for c, fin, fout in [(40, cl, cl), (24, nc, nc), (16, nc, cl)]:
            norm = RMSNorm(c)
            norm.gamma.data.uniform_(0.5, 1.5)
            x = torch.randn(2, c, 3, 5, 7).contiguous(memory_format=fin)
            buf = torch.zeros(2, c, 5, 5, 7).contiguous(memory_format=fout)
            vae_norm.norm_silu_triton(x, norm.gamma, norm.scale, buf[:, :, 2:])
            want = torch.nn.functional.silu(norm(x))
            assert ((buf[:, :, 2:] - want).norm() / want.norm()) < 1e-6 and buf[:, :, :2].abs().max() == 0
        # an output with no [B, C, S] view (time axis outermost: seen on the GPU) and the default output
        x = torch.randn(2, 8, 3, 5, 7)
        norm = RMSNorm(8)
        odd = torch.zeros(3, 2, 8, 5, 7).permute(1, 2, 0, 3, 4)
        vae_norm.norm_silu_triton(x, norm.gamma, norm.scale, odd)
        want = torch.nn.functional.silu(norm(x))
        assert ((odd - want).norm() / want.norm()) < 1e-6
        assert ((av.norm_silu(norm, x.permute(0, 1, 2, 4, 3), "triton") - want.permute(0, 1, 2, 4, 3)).norm()
                / want.norm()) < 1e-6
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
