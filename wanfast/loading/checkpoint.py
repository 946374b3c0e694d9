"""Checkpoint file I/O: safetensors (single or sharded with an index) and torch .pth files.

Tensors are read lazily (safetensors and ``torch.load(mmap=True)`` both map the file), converted one at a
time to the target device and dtype, and assigned into a module built on the meta device. So a checkpoint
never exists as a full CPU copy, and loading is strict: missing or unexpected keys are an error that names
them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from wanfast import timeline

log = logging.getLogger("wanfast.loading")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, of the wrong layout, or does not match the model."""


def require_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


def safetensors_files(folder: str | os.PathLike, stem: str) -> list[Path]:
    """The shard list of ``{stem}.safetensors`` in ``folder``: from ``{stem}.safetensors.index.json`` if
    present, else the single file. Every shard the index names must exist."""
    folder = Path(folder)
    index = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"unreadable safetensors index {index}: {e}") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"shards named by {index} are missing: {', '.join(missing)}")
        return [folder / s for s in shards]
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no {stem}.safetensors or {stem}.safetensors.index.json in {folder}")


def _header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, parsed header) of a safetensors file, read once; a truncated or
    corrupt file fails here with its name (safetensors maps the file: not later, in a copy)."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"truncated safetensors file {path} ({size} bytes)")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if 8 + header_len > size:
            raise CheckpointError(f"truncated safetensors file {path}: header runs past the end")
        try:
            header = json.loads(f.read(header_len))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"corrupt safetensors header in {path}: {e}") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"truncated safetensors file {path}: {size} bytes, header needs {8 + header_len + end}"
        )
    return 8 + header_len, header


def tensor_shape(files: list[Path], key: str) -> tuple[int, ...] | None:
    """The shape of ``key`` from the safetensors headers of ``files`` (no tensor data read), or None."""
    for path in files:
        _header(path)  # size and header checked before safetensors maps the file
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if key in f.keys():
                return tuple(f.get_slice(key).get_shape())
    return None


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, CPU tensor backed by the mapped file) for every tensor of every shard."""
    for path in files:
        _header(path)  # size and header checked before safetensors maps the file
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error type
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e


def read_safetensors(files: list[Path], device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of ``files``: CPU tensors backed by the mapped files, or, with ``device`` given and
    staged loading on for it (``staged_load_enabled``), tensors already on ``device`` (``read_staged``).
    The same bytes either way."""
    how = "mapped"
    if device is not None and staged_load_enabled(device, files):
        try:
            sd = read_staged(files, device)
            timeline.annotate(read="staged")  # the --timings report says what was done, fallback included
            return sd
        except (RuntimeError, OSError) as e:  # e.g. pinned memory refused (a container's memlock limit)
            if _staged_forced():  # asked for by name: no quiet fallback
                raise
            log.warning("staged reads failed (%s): reading %s through the mapped files", e, files[0].parent)
            how = "mapped (staged failed)"
    if device is not None:  # a device's weights (an expert); a LoRA file read beside it leaves no note
        timeline.annotate(read=how)
    return dict(iter_safetensors(files))


def _staged_forced() -> bool | None:
    """``WANFAST_STAGED_LOAD``: "1" True (always staged), "0" False (never), else None (the default rule)."""
    env = os.environ.get("WANFAST_STAGED_LOAD", "")
    return env == "1" if env in ("0", "1") else None


WIDE_STAGE_LIMIT = 2**30  # float32/64 bytes above which the default leaves a file to the mapped path


def staged_load_enabled(device: str | torch.device, files: list[Path] | None = None) -> bool:
    """Whether safetensors for ``device`` are read by ``read_staged`` (parallel positional reads into
    pinned buffers): ``WANFAST_STAGED_LOAD=1`` always, ``=0`` never; by default on for CUDA (measured on the
    H200 host: a bf16 expert from the page cache 21.7 GB/s vs 6.7 mapped, from disk 1.21x vs 1.48x the
    ``dd`` time), except for files holding over 1 GiB of float32/64: those land on the GPU whole in their
    own dtype before the cast, so the mapped path, which casts tensor by tensor, keeps the peak lower."""
    forced = _staged_forced()
    if forced is not None:
        return forced
    if torch.device(device).type != "cuda":
        return False
    wide = 0
    for path in files or []:
        for key, meta in _header(path)[1].items():
            if key != "__metadata__" and meta["dtype"] in ("F32", "F64"):
                wide += meta["data_offsets"][1] - meta["data_offsets"][0]
    return wide <= WIDE_STAGE_LIMIT


def load_readers() -> int:
    """Reader threads of ``read_staged`` (``WANFAST_LOAD_READERS``; default min(8, CPUs)): one thread's
    page-cache copy runs at ~6 GB/s on the H200 hosts, the GPU copy engine at ~55 GB/s."""
    env = os.environ.get("WANFAST_LOAD_READERS", "")
    n = int(env) if env.strip() else min(8, os.cpu_count() or 1)
    if n < 1:
        raise ValueError(f"WANFAST_LOAD_READERS must be >= 1, got {env!r}")
    return n


# safetensors dtype names -> torch dtypes
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # fmt: skip
STAGE_BYTES = 32 * 2**20  # one read: large for the disk and the copy engine; 2 per reader thread in flight


def _pread(fd: int, view: memoryview, offset: int, path: Path) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if not n:
            raise CheckpointError(f"truncated safetensors file {path}")
        got += n


def _plan_chunks(files: list[Path], device: torch.device, stage_bytes: int) -> tuple[dict, list]:
    """Every tensor allocated on ``device`` (on this thread: the default stream owns the memory), and the
    files' data sections cut into byte ranges of at most ``stage_bytes``, each with the tensor pieces it
    fills: (path, file offset, length, [(dst uint8 [n] view, offset in the range)])."""
    out: dict[str, torch.Tensor] = {}
    chunks: list[tuple[Path, int, int, list]] = []
    for path in files:
        base, header = _header(path)
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][0])  # fmt: skip
        spans = []
        for key, meta in entries:
            if meta["dtype"] not in _ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {meta['dtype']}")
            out[key] = dst = torch.empty(meta["shape"], dtype=_ST_DTYPES[meta["dtype"]], device=device)
            start, end = meta["data_offsets"]
            if end - start != dst.numel() * dst.element_size():
                raise CheckpointError(f"{path}: tensor {key} holds {end - start} bytes, its shape needs more")
            if end > start:
                spans.append((start, end, dst.reshape(-1).view(torch.uint8)))
        data_end = max((e for _, e, _ in spans), default=0)
        i = 0
        for a in range(0, data_end, stage_bytes):
            b = min(a + stage_bytes, data_end)
            pieces = []
            while i < len(spans) and spans[i][0] < b:
                start, end, flat = spans[i]
                lo, hi = max(start, a), min(end, b)
                if hi > lo:
                    pieces.append((flat[lo - start : hi - start], lo - a))
                if end <= b:
                    i += 1
                else:
                    break  # the tensor goes on in the next range
            if pieces:
                chunks.append((path, base + a, b - a, pieces))
    return out, chunks


def read_staged(
    files: list[Path], device: str | torch.device, stage_bytes: int = STAGE_BYTES, readers: int | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of ``files`` on ``device``, read with large positional reads by ``readers`` threads in
    parallel (no page-fault-driven mmap copies, no per-tensor reads). For CUDA each thread reads a byte
    range into one of its two pinned buffers and copies the pieces to their tensors on its own stream (the
    read of the next range overlaps those copies); for the CPU the ranges are read straight into the
    tensors. Tensors keep the file's dtype; bytes are copied verbatim."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda and device.index is None:  # the caller's current device, resolved here: a thread's starts at 0
        device = torch.device("cuda", torch.cuda.current_device())
    out, chunks = _plan_chunks(files, device, stage_bytes)
    fds = {p: os.open(p, os.O_RDONLY) for p in dict.fromkeys(c[0] for c in chunks)}
    local, states = threading.local(), []
    lock = threading.Lock()

    def work(chunk: tuple[Path, int, int, list]) -> None:
        path, offset, n, pieces = chunk
        if not cuda:
            for dst, at in pieces:
                _pread(fds[path], memoryview(dst.numpy()), offset + at, path)
            return
        st = getattr(local, "st", None)
        if st is None:  # [pinned buffers, their copies' events, turn, stream]
            torch.cuda.set_device(device)  # this thread's pinned buffers and stream on the tensors' GPU
            st = local.st = [[None, None], [None, None], 0, torch.cuda.Stream(device)]
            with lock:
                states.append(st)
        turn = st[2]
        st[2] = 1 - turn
        if st[1][turn] is not None:
            st[1][turn].synchronize()  # this buffer's earlier copies are done: it may be refilled
        if st[0][turn] is None:
            st[0][turn] = torch.empty(stage_bytes, dtype=torch.uint8, pin_memory=True)
        buf = st[0][turn]
        _pread(fds[path], memoryview(buf.numpy())[:n], offset, path)
        with torch.cuda.stream(st[3]):
            for dst, at in pieces:
                dst.copy_(buf[at : at + dst.numel()], non_blocking=True)
            st[1][turn] = torch.cuda.Event()
            st[1][turn].record(st[3])

    try:
        with ThreadPoolExecutor(min(readers or load_readers(), max(1, len(chunks))),
                                thread_name_prefix="wanfast-read") as pool:  # fmt: skip
            for _ in pool.map(work, chunks):
                pass
        for st in states:
            st[3].synchronize()
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def read_pth(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """A torch state dict, memory-mapped (no full read into RAM)."""
    path = require_file(path, what)
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {what} {path} (truncated or corrupt?): {e}") from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{what} {path} does not hold a state dict")
    return sd


def read_json(path: str | os.PathLike, what: str) -> dict:
    path = require_file(path, what)
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"unreadable {what} {path}: {e}") from e


def check_state_dict(ref: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Strict: the same keys as the model built from the config (``ref``), each with its shape."""
    missing, unexpected = sorted(ref.keys() - state_dict.keys()), sorted(state_dict.keys() - ref.keys())
    if missing or unexpected:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {show(unexpected)}")
        raise CheckpointError(f"{what} does not match the model built from its config; " + "; ".join(parts))
    for name, t in state_dict.items():
        if tuple(t.shape) != tuple(ref[name].shape):
            raise CheckpointError(
                f"{what}: tensor {name} has shape {tuple(t.shape)}, the config implies {tuple(ref[name].shape)}"
            )


def load_module(
    build: Callable[[], nn.Module],
    state_dict: dict[str, torch.Tensor],
    device: str | torch.device,
    dtype: torch.dtype,
    what: str,
    keep_fp32: Callable[[str], bool] = lambda name: False,
) -> nn.Module:
    """Build ``build()`` on the meta device and assign ``state_dict`` into it, strictly.

    Each tensor moves to ``device`` on its own, floating tensors cast to ``dtype`` (or float32 where
    ``keep_fp32(name)``). Non-persistent buffers are rebuilt by the module's ``init_buffers(device)`` if
    it has one. ``state_dict`` is consumed (empty after): a source already on the device (staged reads)
    is freed as its cast copy is made, so a cast never holds the whole model twice there.
    """
    with torch.device("meta"):
        model = build()
    ref = model.state_dict()
    check_state_dict(ref, state_dict, what)
    converted = {}
    for name in list(state_dict):
        t = state_dict.pop(name)
        target = (torch.float32 if keep_fp32(name) else dtype) if t.is_floating_point() else t.dtype
        converted[name] = t.to(device=device, dtype=target)
    model.load_state_dict(converted, strict=True, assign=True)
    if hasattr(model, "init_buffers"):
        model.init_buffers(torch.device(device))
    leftover = [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise CheckpointError(f"{what}: buffers not initialised after loading: {leftover[:4]}")
    return model.eval().requires_grad_(False)
