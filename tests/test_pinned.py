"""Host buffers for offloaded weights (wanfast.accel.pinned) on the CPU: views keep dtype, shape, strides and
values; one flat buffer costs the weights' bytes (no power-of-two rounding), is registered once and
unregistered when collected (the CUDA calls are recorded stand-ins here); the host-memory check."""

from __future__ import annotations

import gc

import pytest
import torch

from wanfast.accel import pinned
from wanfast.config import ConfigError


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(300, 70, generator=g).to(torch.bfloat16),
        torch.randn(33, generator=g),
        torch.randn(64, 48, generator=g).to(torch.float8_e4m3fn),
        torch.randn(40, 30, generator=g).t(),  # non-contiguous: strides are kept
        torch.tensor(3.5),  # 0-d
        torch.empty(0, 5),
        torch.randint(0, 9, (17,), generator=g),  # int64
    ]


def test_views_keep_dtype_shape_strides_values_in_one_buffer():
    src = _tensors()
    buf = pinned.HostBuffer(src, pin=False)
    assert not buf.pinned
    storage = buf.buffer.untyped_storage().data_ptr()
    for t, h in zip(src, buf.views, strict=True):
        assert (h.dtype, h.shape, h.stride()) == (t.dtype, t.shape, t.stride())
        assert h.untyped_storage().data_ptr() == storage  # all in the one flat buffer
        assert h.data_ptr() % pinned.ALIGN == 0  # absolute alignment
    originals = [t.clone() for t in src]
    views = buf.adopt(src)
    for t, h, o in zip(src, views, originals, strict=True):
        assert t.data_ptr() == h.data_ptr()  # the tensor now lives in the buffer
        assert torch.equal(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                           o.view(torch.uint8) if o.dtype == torch.float8_e4m3fn else o)  # fmt: skip


def test_buffer_costs_the_bytes_not_a_power_of_two():
    # 3 x 5 MB tensors: per-tensor pinned allocations round each up to 8 MB (+60%); the flat buffer does not
    src = [torch.empty(5 * 2**20, dtype=torch.uint8) for _ in range(3)]
    buf = pinned.HostBuffer(src, pin=False)
    raw = sum(t.numel() for t in src)
    assert raw <= buf.nbytes <= raw + pinned.ALIGN * len(src)


def test_registered_once_and_unregistered_when_collected(monkeypatch):
    calls = []
    monkeypatch.setattr(pinned, "register", lambda b: calls.append(("register", b.data_ptr(), b.numel())))
    monkeypatch.setattr(pinned, "unregister", lambda ptr: calls.append(("unregister", ptr)))
    buf = pinned.HostBuffer(_tensors(), pin=True)
    assert buf.pinned
    ptr, size = buf.buffer.data_ptr(), buf.nbytes
    assert calls == [("register", ptr, size)]
    del buf
    gc.collect()
    assert calls == [("register", ptr, size), ("unregister", ptr)]


def test_no_registration_when_not_pinned(monkeypatch):
    monkeypatch.setattr(pinned, "register", lambda b: pytest.fail("registered without pin"))
    assert not pinned.HostBuffer(_tensors(), pin=False).pinned


def test_host_room_check(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       131072000 kB\nMemAvailable:    10485760 kB\n")  # 10 GiB available
    assert pinned.available_host_bytes(str(meminfo)) == 10 * 2**30
    pinned.check_host_room(9 * 2**30, "--offload expert", str(meminfo))  # fits: no error
    with pytest.raises(
        ConfigError, match=r"--offload expert keeps 57\.2 GiB .* only 10\.0 GiB .*--quant fp8"
    ):
        pinned.check_host_room(int(57.2 * 2**30), "--offload expert", str(meminfo))
    assert pinned.available_host_bytes(str(tmp_path / "missing")) is None  # not Linux: no check
    pinned.check_host_room(2**60, "--offload blocks", str(tmp_path / "missing"))


def test_unregister_never_raises(caplog):
    """Run by a finalizer, possibly at interpreter exit when CUDA is gone: failures are logged, not raised
    (here torch.cuda.cudart() itself fails: no CUDA in this build, or a bad pointer)."""
    import logging

    with caplog.at_level(logging.DEBUG, logger="wanfast.accel.pinned"):
        pinned.unregister(0)
    assert "cudaHostUnregister(0x0) failed" in caplog.text
