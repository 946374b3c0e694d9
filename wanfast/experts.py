"""A pipeline's DiT experts by name, one of which may still be loading.

A two-expert model runs the high-noise expert first and the low-noise one only from the boundary on, steps
later; so a fresh process (``wanfast generate``) can start denoising while the low-noise expert is read
(``builder``: ``BuildPlan.overlap_load``). The entry of an expert still loading holds the load's ``Future``.
Reading that entry (``experts[name]``, ``values()``, ``items()``) waits for it and re-raises what the load
raised, so every consumer of a pipeline's experts sees loaded modules without knowing of the overlap;
``ready()`` gives the loaded ones without waiting (accel, the per-request cache reset), and the sampling
loop looks its expert up when it needs it (``accel.stepcache.ForwardCounter``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from concurrent.futures import Future

from torch import nn

from wanfast import timeline


class _Loading:
    """An entry still loading: the Future that gives its module."""

    def __init__(self, future: Future) -> None:
        self.future = future


class Experts(MutableMapping):
    """name -> DiT module (``nn.Module`` or a wrapper such as ``CUDAGraphDiT``), in the spec's order."""

    def __init__(self, experts: Mapping[str, nn.Module] | None = None) -> None:
        self._items: dict[str, object] = dict(experts or {})

    def defer(self, name: str, future: Future) -> None:
        """``name`` is being loaded: its entry is ``future``'s result once someone reads it."""
        self._items[name] = _Loading(future)

    def __getitem__(self, name: str) -> nn.Module:
        item = self._items[name]
        if isinstance(item, _Loading):
            if item.future.done():
                module = item.future.result()
            else:  # the caller needs it now: the time it waits is what the overlap did not hide
                with timeline.span(f"wait_expert_{name}"):
                    module = item.future.result()
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
        """The names whose load has not been collected yet (a finished load counts until it is read)."""
        return tuple(n for n, item in self._items.items() if isinstance(item, _Loading))

    def ready(self) -> dict[str, nn.Module]:
        """The loaded entries, without waiting for the others."""
        return {n: item for n, item in self._items.items() if not isinstance(item, _Loading)}

    def wait(self) -> Experts:
        """Every entry loaded (raises what a load raised); returns self."""
        for name in self.loading():
            self[name]
        return self

    def __repr__(self) -> str:
        names = [f"{n} (loading)" if isinstance(i, _Loading) else n for n, i in self._items.items()]
        return f"Experts({', '.join(names)})"
