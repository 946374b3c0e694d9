"""``--compile-cache DIR``: torch.compile's artifacts kept on disk and reused by later processes and machines.

The regional compile (``compile.py``) costs a Dynamo trace and an Inductor compile of the block graphs per
latent size in every fresh process. Inductor already caches compiled graphs by content (the FX graph cache
and the AOT autograd cache, keyed by the graph, its input metadata, the torch/triton versions and the
device); this module points those caches at ``DIR`` and adds portable per-size "mega-cache" files
(``torch.compiler.save_cache_artifacts``), so a cache built on one machine can be copied to another:

    DIR/<model key>/inductor/           TORCHINDUCTOR_CACHE_DIR: FX graphs, AOT autograd entries, kernels
    DIR/<model key>/<W>x<H>x<F>.bin     the artifacts a request of that size compiled (mega-cache)

``<model key>`` names what changes the traced graphs: model, dtype, FP8, attention backends, compile
mode, device kind and torch version. A new process loads the files of the sizes it plans (``load``)
before the first compile; a request whose size has no file yet writes one after it ran (``save``). What
is left on a hit: Dynamo's trace of the block (seconds) and loading the compiled code.

One cache directory per process: Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` from the environment.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from wanfast.config import EngineSettings

log = logging.getLogger("wanfast.compile_cache")

Size = tuple[int, int, int]  # (width, height, frames)


def size_name(size: Size) -> str:
    return "x".join(str(int(v)) for v in size)


def model_key(model_name: str, settings: EngineSettings, fp8_checkpoint: bool = False) -> str:
    """A readable folder name for everything that changes the compiled block graphs (torch's own cache
    keys still guard correctness: a wrong key only costs a miss)."""
    dev = torch.device(settings.device or "cpu")
    kind = dev.type
    if kind == "cuda" and torch.cuda.is_available():
        kind = torch.cuda.get_device_name(dev).replace("NVIDIA ", "")
    parts = [
        model_name,
        str(settings.dtype).removeprefix("torch."),
        "fp8" if settings.quant == "fp8" or fp8_checkpoint else "nofp8",
        f"attn-{settings.attention_backend}-{settings.self_attention_backend or 'same'}",
        f"mode-{settings.compile_mode or 'default'}",
        kind,
        f"torch-{torch.__version__}",
    ]
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "_".join(parts))


def compile_counters() -> dict[str, int]:
    """This process's compile cache counters (Inductor FX graph cache, AOT autograd cache) and the
    number of graphs Dynamo produced."""
    from torch._dynamo.utils import counters

    return {
        "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
        "fxgraph_cache_bypass": counters["inductor"]["fxgraph_cache_bypass"],
        "autograd_cache_hit": counters["aot_autograd"]["autograd_cache_hit"],
        "autograd_cache_miss": counters["aot_autograd"]["autograd_cache_miss"],
        "unique_graphs": counters["stats"]["unique_graphs"],
    }


class CompileCache:
    """The compile cache of one model key under ``root`` (module docstring)."""

    def __init__(self, root: str | os.PathLike, key: str) -> None:
        self.root, self.key = Path(root), key
        self.folder = self.root / key
        self.loaded: set[str] = set()  # size names whose artifacts this process loaded or saved

    def activate(self) -> None:
        """Point Inductor's on-disk caches at ``folder/inductor`` and make sure they are on; must run
        before the first compile of the process."""
        inductor = self.folder / "inductor"
        inductor.mkdir(parents=True, exist_ok=True)
        previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if previous and Path(previous).resolve() != inductor.resolve():
            log.warning("compile cache: TORCHINDUCTOR_CACHE_DIR was %s, now %s", previous, inductor)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
        os.environ.pop("TRITON_CACHE_DIR", None)  # Triton kernels then live under the inductor folder
        torch._inductor.config.fx_graph_cache = True
        torch._functorch.config.enable_autograd_cache = True

    def path(self, size: Size) -> Path:
        return self.folder / f"{size_name(size)}.bin"

    def load(self, sizes: Iterable[Size]) -> list[str]:
        """Load the artifact files of ``sizes`` that exist (into the caches ``activate`` set); returns the
        size names loaded."""
        done = []
        for size in sizes:
            name, path = size_name(size), self.path(size)
            if name in self.loaded or not path.is_file():
                continue
            try:  # None: torch could not read the file (it logs why)
                info = torch.compiler.load_cache_artifacts(path.read_bytes())
            except Exception as e:  # a file from another torch build: recompile, do not fail the run
                info, why = None, e
            else:
                why = "unreadable"
            if info is None:
                log.warning("compile cache: cannot load %s (%s); compiling instead", path, why)
                continue
            self.loaded.add(name)
            done.append(name)
        if done:
            log.info("compile cache: loaded %s from %s", ", ".join(done), self.folder)
        return done

    def save(self, size: Size) -> Path | None:
        """After a request of ``size`` ran: write the artifacts this process recorded, unless that size's
        file was loaded or written already. Returns the path written, or None."""
        name = size_name(size)
        if name in self.loaded:
            return None
        got = torch.compiler.save_cache_artifacts()
        self.loaded.add(name)
        if got is None:
            return None
        path = self.path(size)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(got[0])
        tmp.replace(path)  # atomic: a concurrent reader sees the old file or the whole new one
        log.info("compile cache: wrote %s (%d bytes)", path, len(got[0]))
        return path


def compile_cache_for(spec_name: str, settings: EngineSettings, fp8_checkpoint: bool = False):
    """The activated ``CompileCache`` for ``settings.compile_cache`` (None when unset)."""
    if not settings.compile_cache:
        return None
    cache = CompileCache(settings.compile_cache, model_key(spec_name, settings, fp8_checkpoint))
    cache.activate()
    return cache
