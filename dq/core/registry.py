"""One registry per extension axis: names to entries, filled by a decorator, read by params and the stages.

timm's `register_model` pattern, for dq's four extension axes: patch scorers (`dq.patches.scorers.SCORERS`),
selection methods (`dq.select.methods.METHODS`), codecs (`dq.data.codec.CODECS`) and data sources
(`dq.data.sources.SOURCES`). Each registry lives in the module that owns its axis, none of which imports
torch, so `dq.params` checks a name against the registry and lists the registered names in its one-line
error. An entry carries the registered object and the traits a stage asks about instead of matching
strings (a scorer: whether it needs the probed backbone; a method: whether it makes bins; ...).

    from dq.patches.scorers import SCORERS, PatchScorer

    @SCORERS.register("brightness", needs_model=False)
    class Brightness(PatchScorer):
        def maps(self, images, labels, positions=None):
            return images.mean(axis=3) / 255.0

A registry iterates, compares and prints like the tuple of its names, in registration order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from dq.core.errors import DQError


@dataclass(frozen=True)
class Entry:
    """A registered name: the object and its declared traits (also readable as attributes)."""

    name: str
    obj: Any
    traits: dict = field(default_factory=dict)

    def __getattr__(self, trait: str):
        try:
            return self.__dict__["traits"][trait]
        except KeyError:
            raise AttributeError(f"{self.__dict__.get('name')!r} declares no trait {trait!r}") from None


class _Lazy:
    def __init__(self, target: str):
        self.target = target

    def load(self):
        import importlib

        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)


class Registry:
    """The names of one extension axis, e.g. `Registry("selection method", "select.method")`."""

    def __init__(self, what: str, key: str, **defaults):
        self.what, self.key, self.defaults = what, key, defaults
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, **traits) -> Callable:
        """A decorator that registers its argument (a class, a function, any object) under `name`."""
        unknown = sorted(set(traits) - set(self.defaults))
        if unknown:
            raise ValueError(f"{self.key}: unknown trait {unknown[0]!r}; a {self.what} declares "
                             f"{', '.join(self.defaults) or 'no traits'}")

        def decorate(obj):
            self._entries[name] = Entry(name, obj, {**self.defaults, **traits})
            return obj

        return decorate

    def register_lazy(self, name: str, target: str, **traits) -> None:
        """Register the object at `target` ("module:attribute"), imported on the first `get`: for entries whose
        module loads torch, so that the names and traits stay readable without it (dq.patches.scorers' GradCAM++)."""
        self.register(name, **traits)(_Lazy(target))

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> Entry:
        """The entry of `name`, or one DQError line naming the key and every registered name."""
        if name not in self._entries:
            raise DQError(f"{self.key} = {name!r} is not a registered {self.what}; expected {self.expected()}")
        entry = self._entries[name]
        if isinstance(entry.obj, _Lazy):
            entry = self._entries[name] = Entry(name, entry.obj.load(), entry.traits)
        return entry

    def expected(self) -> str:
        return f"one of {', '.join(self._entries)}"

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other) -> bool:
        return tuple(self) == tuple(other) if isinstance(other, (tuple, list, Registry)) else NotImplemented

    def __hash__(self):
        return id(self)

    def __repr__(self) -> str:
        return f"Registry({self.key}: {', '.join(self._entries)})"
