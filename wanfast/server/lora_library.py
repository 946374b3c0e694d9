"""The server's LoRA library (``wanfast serve --lora-dir DIR``): the ``.safetensors`` files of one folder
(any layout ``loading.lora_formats`` reads, with an ``adapter_config.json`` beside them where PEFT wrote one),
each named by its file stem. Every file is read and checked against the served model when the server starts
(and again in each worker, against its loaded experts), so a broken library stops the start with the file
named, never a job later.

A request names LoRAs of the library: ``"loras": [{"name": "lightning", "high_noise": 3.0, "low_noise":
1.5}]``; strengths default as the CLI's ``--lora FILE[:HIGH[:LOW]]`` (``config.LoraSpec.parse``): HIGH to 1,
LOW to HIGH. The set is merged in the order given (the order of a float32 sum: ``[A, B]`` and ``[B, A]`` are
two sets). ``canonical`` checks a request's list and gives the form stored with the job; ``set_key`` is the
string the store's grouping compares.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from wanfast.config import ConfigError
from wanfast.specs import ModelSpec

log = logging.getLogger("wanfast.server.worker")

MAX_STRENGTH = 10.0  # |strength| accepted per expert: far past any published recipe (Lightning: 3)
MAX_LORAS = 4  # default most entries of one request (--max-loras); each costs switch time
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class LibraryEntry:
    name: str
    path: Path
    size_bytes: int
    rank: int | None  # the largest rank of its low-rank pairs (None: full deltas only)
    targets: int  # parameters it changes
    full_deltas: bool  # holds .diff / .diff_b / .diff_m deltas
    models: tuple[str, ...]  # the served model and the published Wan2.2 models every target of it fits

    def info(self) -> dict:
        return {
            "name": self.name, "file": self.path.name, "size_bytes": self.size_bytes, "rank": self.rank,
            "targets": self.targets, "full_deltas": self.full_deltas, "models": list(self.models),
        }  # fmt: skip


@dataclass
class LoraLibrary:
    folder: Path
    entries: dict[str, LibraryEntry]
    files: dict[str, object] = field(default_factory=dict)  # name -> LoRAFile, when opened with tensors

    @classmethod
    def open(cls, folder: str | Path, spec: ModelSpec, dit=None, keep: bool = False) -> LoraLibrary:
        """Read and check every file of ``folder`` against the DiT of ``spec`` (a meta-device model: no
        weights) or against ``dit``; ``keep``: hold the read files (the worker's switcher needs them).
        Raises ``ConfigError`` naming the file and what is wrong."""
        import torch

        from wanfast.loading.checkpoint import CheckpointError
        from wanfast.loading.lora import read_lora
        from wanfast.loading.lora_formats import fits
        from wanfast.models.dit import WanDiT

        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"--lora-dir {folder}: not a folder")
        paths = sorted(folder.glob("*.safetensors"))
        if not paths:
            raise ConfigError(f"--lora-dir {folder} holds no .safetensors files")
        if dit is None:
            with torch.device("meta"):
                dit = WanDiT(spec.dit)
        shapes = {k: tuple(p.shape) for k, p in dit.named_parameters()}
        entries, files = {}, {}
        for path in paths:
            name = path.name.removesuffix(".safetensors")
            if not _NAME.match(name):
                raise ConfigError(
                    f"LoRA library file {path.name!r}: a name (file stem) is 1-100 of A-Z a-z 0-9 . _ -, "
                    "starting with a letter or digit; rename it"
                )
            try:
                lora = read_lora(path, dit)
            except (CheckpointError, ValueError, OSError) as e:
                raise ConfigError(f"LoRA library file {path}: {e}") from None
            models = None
            for t in lora.targets():
                fit = set(fits(t, shapes[t]))
                models = fit if models is None else models & fit
            ranks = [a.shape[0] for a, _, _ in lora.pairs.values()]
            entries[name] = LibraryEntry(
                name, path, path.stat().st_size, max(ranks) if ranks else None, len(lora.targets()),
                bool(lora.diffs), tuple(sorted((models or set()) | {spec.name})),
            )  # fmt: skip
            if keep:
                files[name] = lora
        return cls(folder, entries, files)

    def listing(self) -> list[dict]:
        return [e.info() for e in self.entries.values()]

    def canonical(self, loras: list[dict], two_experts: bool, max_loras: int) -> list[dict]:
        """A request's ``loras`` (each ``{"name", "high_noise"?, "low_noise"?}``, types checked by the
        schema) -> the stored form, every strength filled in. Raises ValueError for the client: an unknown
        name, a name twice, a strength not finite or past ``MAX_STRENGTH``, more than ``max_loras``
        entries, a low-noise strength for a one-DiT model."""
        if len(loras) > max_loras:
            raise ValueError(
                f"loras: {len(loras)} entries; this server merges at most {max_loras} per request"
            )
        out, seen = [], set()
        for i, x in enumerate(loras):
            name = x["name"]
            if name not in self.entries:
                known = ", ".join(list(self.entries)[:20])
                raise ValueError(f"loras[{i}]: no LoRA named {name!r} in this server's library ({known})")
            if name in seen:
                raise ValueError(f"loras[{i}]: {name!r} is named twice; give it once, with both strengths")
            seen.add(name)
            if not two_experts and x.get("low_noise") is not None:
                raise ValueError(
                    f"loras[{i}]: this model has one DiT, which takes high_noise; drop low_noise"
                )
            high = 1.0 if x.get("high_noise") is None else float(x["high_noise"])
            low = high if x.get("low_noise") is None else float(x["low_noise"])
            for which, s in (("high_noise", high), ("low_noise", low)):
                if not math.isfinite(s) or abs(s) > MAX_STRENGTH:
                    raise ValueError(f"loras[{i}].{which}: {s} is not a finite strength in ±{MAX_STRENGTH:g}")
            out.append({"name": name, "high_noise": high, "low_noise": low})
        return out

    def stack(self, request: dict) -> list[tuple]:
        """The switcher's stack of a stored request: [(LoRAFile, high, low)] (needs ``keep``). A job queued
        before a restart with another library may name a file that is gone: ConfigError naming it."""
        gone = [x["name"] for x in request.get("loras", ()) if x["name"] not in self.files]
        if gone:
            raise ConfigError(f"LoRA {gone[0]!r} is no longer in the server's library ({self.folder.name})")
        return [(self.files[x["name"]], x["high_noise"], x["low_noise"]) for x in request.get("loras", ())]


def set_key(request: dict) -> str:
    """The LoRA set of a stored request as one comparable string ("[]": none)."""
    return json.dumps(request.get("loras", []), sort_keys=True, separators=(",", ":"))


# ---- the worker's side: its switcher and the switch before each job ----------------------------------


def worker_switcher(pipe, cfg: dict):
    """With ``cfg["lora_dir"]``: the library read and checked against the loaded model, and the switcher
    (``accel/lora_switch.py``) that merges a job's set between jobs, its bases taken from the checkpoint's
    own values (``checkpoint_source``) so that each job equals a fresh build with its set. None without.
    Bases on the GPU when they fit beside the activations of the largest default-limit request (2.5x the
    model's default request, ``schemas.LIMIT_FACTOR``) plus 10% of the device; else pinned host memory."""
    if not cfg.get("lora_dir"):
        return None
    import torch

    from wanfast.accel.lora_switch import enable_lora_switching
    from wanfast.accel.offload import activation_bytes
    from wanfast.loading.lora import checkpoint_source
    from wanfast.server.schemas import LIMIT_FACTOR

    library = LoraLibrary.open(cfg["lora_dir"], pipe.spec, keep=True)
    paths = None
    if not cfg.get("synthetic"):
        from wanfast.builder import open_model
        from wanfast.specs import SPECS

        source = cfg["source"]
        if source in SPECS:  # a tiny model's checkpoint, as the builder wrote (and deleted) it: seed 0
            from wanfast.tools.testing import write_official_checkpoint

            folder = Path(cfg["data_dir"]) / "tiny-checkpoint"
            write_official_checkpoint(folder, SPECS[source], seed=0)
            source = folder
        paths = open_model(source).paths
    sources = {n: checkpoint_source(paths.experts[n]) for n in pipe.experts} if paths else None
    d = pipe.spec.defaults
    reserve = int(LIMIT_FACTOR * activation_bytes(pipe.spec, d.size, d.frames))
    if pipe.device.type == "cuda":
        reserve += torch.cuda.get_device_properties(pipe.device).total_memory // 10
    switcher = enable_lora_switching(pipe, library.files.values(), sources, reserve=reserve)
    switcher.library, pipe.lora_key = library, set_key({})  # built without LoRAs: the empty set held
    log.info("LoRA library: %d files, bases in %s memory", len(library.files), switcher.placement)
    return switcher


def switch_for_job(pipe, request: dict) -> float | None:
    """Merge the LoRA set of a job's ``request`` (seconds it took; None without a library)."""
    switcher = getattr(pipe, "lora_switcher", None)
    if switcher is None:
        return None
    from wanfast.accel.lora_switch import switch_loras

    key, pipe.lora_key = set_key(request), None  # unknown until the switch has completed
    seconds = switch_loras(pipe, switcher.library.stack(request))
    pipe.lora_key = key
    return seconds
