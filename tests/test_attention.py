"""The attention registry: auto order, errors, override, a fake backend, library backends as custom ops."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from wanfast import attention
from wanfast.accel import choose_attention
from wanfast.attention import Backend
from wanfast.config import EngineSettings
from wanfast.models.dit import WanDiT
from wanfast.specs import SPECS


def reference(q, k, v):
    """Exact softmax attention on [B, L, H, D], computed independently of the registry."""
    w = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", w.softmax(-1), v.double()).to(q.dtype)


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    """Every test gets its own copy of the registry and no chosen backend; both are restored after."""
    monkeypatch.setattr(attention, "_REGISTRY", dict(attention._REGISTRY))
    monkeypatch.setattr(attention, "_KERNELS", dict(attention._KERNELS))
    monkeypatch.setattr(attention, "_active", None)


def fake(available: bool, lossy: bool = False) -> Backend:
    return Backend(lambda: attention._sdpa, lambda: available, lossy)


def test_auto_on_cpu_is_sdpa():
    assert attention.resolve_backend("auto", "cpu") == "sdpa"
    assert attention.set_backend("auto", "cpu") == "sdpa" and attention.active_backend() == "sdpa"


def test_auto_order_on_cuda(monkeypatch):
    for name in ("sdpa-cudnn", "flash3", "flash2", "sage"):
        monkeypatch.setitem(attention._REGISTRY, name, fake(True, lossy=name == "sage"))
    assert attention.resolve_backend("auto", "cuda") == "flash3"  # measured fastest first
    monkeypatch.setitem(attention._REGISTRY, "flash3", fake(False))
    assert attention.resolve_backend("auto", "cuda") == "sdpa-cudnn"
    monkeypatch.setitem(attention._REGISTRY, "sdpa-cudnn", fake(False))
    assert attention.resolve_backend("auto", "cuda") == "flash2"
    monkeypatch.setitem(attention._REGISTRY, "flash2", fake(False))
    assert attention.resolve_backend("auto", "cuda") == "sdpa"  # sage is available but lossy


def test_lossy_backend_is_never_auto_even_first_in_order(monkeypatch):
    monkeypatch.setitem(attention._REGISTRY, "sage", fake(True, lossy=True))
    monkeypatch.setattr(attention, "_AUTO_ORDER_CUDA", ("sage", "sdpa"))
    assert attention.resolve_backend("auto", "cuda") == "sdpa"
    assert attention.set_backend("sage") == "sage"  # named explicitly, it is used


def test_unknown_and_unavailable_backends_fail_loudly():
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        attention.set_backend("nope")
    attention.register_backend("offline", lambda: attention._sdpa, lambda: False)
    with pytest.raises(RuntimeError, match="'offline' is not available here"):
        attention.set_backend("offline")
    assert attention.active_backend() is None
    if not torch.cuda.is_available():
        for name in ("sdpa-cudnn", "flash3", "flash2", "sage"):
            with pytest.raises(RuntimeError, match="not available"):
                attention.set_backend(name, "cpu")


def test_override_is_logged_and_kept_by_auto(caplog):
    with caplog.at_level(logging.INFO, logger="wanfast.attention"):
        assert attention.set_backend("sdpa-math") == "sdpa-math"
    assert "attention backend: sdpa-math" in caplog.text
    settings = EngineSettings(device="cpu", dtype=torch.float32)
    assert choose_attention(settings) == "sdpa-math"  # "auto" keeps an explicit earlier choice
    assert choose_attention(EngineSettings(device="cpu", attention_backend="sdpa")) == "sdpa"  # a name wins
    assert attention.active_backend() == "sdpa"


def test_fake_backend_is_called_with_BLHD_tensors():
    cfg = SPECS["tiny"].dit  # 4 heads of 16, 2 layers, text_len 32
    calls = []

    def factory():
        def fn(q, k, v):
            calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
            return reference(q, k, v)

        return fn

    attention.register_backend("fake", factory, lambda: True)
    torch.manual_seed(0)
    model = WanDiT(cfg).eval()
    x, t, ctx = torch.randn(1, 16, 3, 6, 8), torch.tensor([500.0]), torch.randn(1, 7, cfg.text_dim)
    with torch.no_grad():
        attention.set_backend("sdpa")
        expected = model(x, t, ctx)
        attention.set_backend("fake")
        out = model(x, t, ctx)
    L = 3 * 3 * 4  # (f, h/2, w/2) patch grid
    self_call, cross_call = ((1, L, 4, 16),) * 3, ((1, L, 4, 16), (1, 32, 4, 16), (1, 32, 4, 16))
    assert calls == [self_call, cross_call] * cfg.num_layers
    assert ((out - expected).norm() / expected.norm()).item() <= 1e-5


def _install_fake_module(monkeypatch, name: str, **attrs):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, v in attrs.items():
        setattr(module, k, v)
    monkeypatch.setitem(sys.modules, name, module)


def test_library_backends_are_custom_ops_fed_BLHD(monkeypatch):
    seen = []

    def fa3(q, k, v):  # an FA3 release that returns (out, lse)
        seen.append(("flash3", q.shape))
        return reference(q, k, v), torch.zeros(1)

    def fa2(q, k, v):
        seen.append(("flash2", q.shape))
        return reference(q, k, v)

    def sage(q, k, v, tensor_layout, is_causal):
        seen.append(("sage", q.shape, tensor_layout, is_causal))
        return reference(q, k, v)

    _install_fake_module(monkeypatch, "flash_attn_interface", flash_attn_func=fa3)
    _install_fake_module(monkeypatch, "flash_attn", flash_attn_func=fa2)
    _install_fake_module(monkeypatch, "sageattention", sageattn=sage)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 24, 4, 16, generator=g) for _ in range(3))
    expected = F.scaled_dot_product_attention(*(u.transpose(1, 2) for u in (q, k, v))).transpose(1, 2)
    for name in ("flash3", "flash2", "sage"):
        fn = attention._REGISTRY[name].factory()
        assert isinstance(fn, torch._library.custom_ops.CustomOpDef)
        out = fn(q, k, v)
        assert out.shape == q.shape and (out - expected).abs().max() < 1e-5
        # fullgraph tracing sees one opaque op (its fake implementation gives the output's shape)
        compiled = torch.compile(lambda a, b, c, fn=fn: fn(a, b, c) * 2, fullgraph=True, backend="eager")
        assert torch.allclose(compiled(q, k, v), 2 * out)
    assert [s[0] for s in seen] == ["flash3"] * 2 + ["flash2"] * 2 + ["sage"] * 2  # eager call, compiled call
    assert all(s[1] == (2, 24, 4, 16) for s in seen)
    assert ("sage", (2, 24, 4, 16), "NHD", False) in seen
    if not torch.cuda.is_available():  # importable but no GPU: not available, so auto cannot pick them
        assert not any(attention._REGISTRY[n].available() for n in ("flash3", "flash2", "sage"))


def test_flash3_falls_back_to_the_forward_only_wheel(monkeypatch):
    """With no upstream ``flash_attn_interface``, FA3 comes from ``fa3_fwd_interface`` (the fa3-fwd wheel)."""
    calls = []

    def fa3_fwd(q, k, v):
        calls.append(q.shape)
        return reference(q, k, v)

    monkeypatch.delitem(sys.modules, "flash_attn_interface", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: None if n == "flash_attn_interface" else real_find_spec(n, *a),
    )
    _install_fake_module(monkeypatch, "fa3_fwd_interface", flash_attn_func=fa3_fwd)
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    out = attention._REGISTRY["flash3"].factory()(q, k, v)
    assert calls == [(1, 8, 2, 16)] and torch.allclose(out, reference(q, k, v), atol=1e-5)
