"""A pipeline's DiT experts by name, one of which may not be loaded yet.

A two-expert model runs the high-noise expert first and the low-noise one only from the boundary on, steps
later; so a fresh process (``wanfast generate``) can start denoising before the low-noise expert is read
(``builder``: ``BuildPlan.overlap_load``). Its entry holds a function that starts the load and returns its
``Future``. ``WanPipeline.run`` starts it when the first step has run (``start_loading``): the disk is then
free of the process's own reads and imports, and of the first step's compile, which on a cold page cache
would wait behind it (measured: BENCHMARKS.md). Reading the entry (``experts[name]``, ``values()``,
``items()``) starts it if nobody has, waits for it and re-raises what the load raised, so every consumer of a
pipeline's experts sees loaded modules without knowing of the overlap; ``ready()`` gives the loaded ones
without waiting (accel, the per-request cache reset), and the sampling loop looks its expert up when it
needs it (``accel.stepcache.ForwardCounter``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping
from concurrent.futures import Future

from torch import nn

from wanfast import timeline


class _Loading:
    """An entry not loaded yet: ``start()`` begins its load and returns the Future of its module."""

    def __init__(self, start: Callable[[], Future]) -> None:
        self.start, self.future = start, None

    def begin(self) -> Future:
        if self.future is None:
            self.future = self.start()
        return self.future


class Experts(MutableMapping):
    """name -> DiT module (``nn.Module`` or a wrapper such as ``CUDAGraphDiT``), in the spec's order."""

    def __init__(self, experts: Mapping[str, nn.Module] | None = None) -> None:
        self._items: dict[str, object] = dict(experts or {})

    def defer(self, name: str, start: Callable[[], Future]) -> None:
        """``name`` loads later: ``start()`` begins its load (``start_loading``, or the first read of the
        entry) and returns the Future of its module."""
        self._items[name] = _Loading(start)

    def start_loading(self) -> None:
        """Begin every deferred load not begun yet (each once)."""
        for item in self._items.values():
            if isinstance(item, _Loading):
                item.begin()

    def __getitem__(self, name: str) -> nn.Module:
        item = self._items[name]
        if isinstance(item, _Loading):
            future = item.begin()
            if future.done():
                module = future.result()
            else:  # the caller needs it now: the time it waits is what the overlap did not hide
                with timeline.span(f"wait_expert_{name}"):
                    module = future.result()
            if self._items.get(name) is item:  # not replaced meanwhile
                self._items[name] = module
            item = module
        return item

    def __setitem__(self, name: str, module: nn.Module) -> None:
        self._items[name] = module

    def __delitem__(self, name: str) -> None:
        del self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def loading(self) -> tuple[str, ...]:
        """The names not collected yet: deferred, loading, or loaded and not read since."""
        return tuple(n for n, item in self._items.items() if isinstance(item, _Loading))

    def ready(self) -> dict[str, nn.Module]:
        """The loaded entries, without waiting for the others."""
        return {n: item for n, item in self._items.items() if not isinstance(item, _Loading)}

    def __repr__(self) -> str:
        names = [f"{n} (loading)" if isinstance(i, _Loading) else n for n, i in self._items.items()]
        return f"Experts({', '.join(names)})"
