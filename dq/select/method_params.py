"""The params of the selection methods: each registered method declares its own small frozen dataclass.

Every key of params.yaml's `select` section but `method` is a field of a registered method's params
(`@METHODS.register("name", params=SomeParams)`, dq.select.methods): a frozen dataclass whose fields all have
a default, usually a `MethodParams` whose fields carry a `Rule` (`param(default, rule)`), checked when it is
built. Params validation (dq.params.SelectParams) types every key by the annotation of the dataclass that
declares it and rule-checks it by building every registered method's params; `select_indices` builds the
chosen method's alone. A key several methods declare (`beta`: ccs, d2 and dq-ccs) has one type and one
default, which `MethodRegistry` checks when a method registers.

    @dataclass(frozen=True)
    class StrideParams(MethodParams):
        stride: int = param(2, Rule(lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"))
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from dq.core.errors import DQError
from dq.core.registry import Registry


@dataclass(frozen=True)
class Rule:
    """What a select.* value must be: `ok(value)`, or else one DQError line saying what was `expected`."""

    ok: Callable[[Any], bool]
    expected: str

    def check(self, key: str, value) -> None:
        if not self.ok(value):
            raise DQError(f"select.{key} = {value!r} is not allowed; expected {self.expected}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _is_count(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def one_of(names: tuple[str, ...]) -> Rule:
    return Rule(lambda value: value in names, f"one of {', '.join(names)}")


COUNT = Rule(_is_count, "a positive integer")
POSITIVE = Rule(lambda value: _is_number(value) and value > 0, "a finite number > 0")
NON_NEGATIVE = Rule(lambda value: _is_number(value) and value >= 0, "a finite number >= 0")
SHARE = Rule(lambda value: _is_number(value) and 0 <= value < 1, "a number in [0, 1)")
FLAG = Rule(lambda value: isinstance(value, (bool, np.bool_)), "true or false")


def param(default, rule: Rule):
    """A field of a method's params: its default (the value when params.yaml leaves the key out) and its rule."""
    return field(default=default, metadata={"rule": rule})


@dataclass(frozen=True)
class MethodParams:
    """Base of a method's params: building one checks every field by its rule (one DQError line)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            rule = f.metadata.get("rule")
            if rule is not None:
                rule.check(f.name, getattr(self, f.name))


@dataclass(frozen=True)
class NoParams(MethodParams):
    """The params of a method that takes none (random, moderate)."""


def _fields_of(params: type) -> dict[str, tuple[Any, Any]]:
    """key -> (type, default) of a params dataclass, types resolved from its annotations."""
    hints = typing.get_type_hints(params)
    return {f.name: (hints[f.name], f.default) for f in dataclasses.fields(params)}


class MethodRegistry(Registry):
    """A dq.core.registry.Registry whose entries declare their params dataclass (the trait `params`): it knows
    every select.* key, its type and its default without loading a method registered by path."""

    def register(self, name: str, **traits) -> Callable:
        self._check_declarations(name, traits.get("params", self.defaults["params"]))
        return super().register(name, **traits)

    def _check_declarations(self, name: str, params) -> None:
        """A key shared with another method must have its type and default; every key needs a default."""
        if not (isinstance(params, type) and dataclasses.is_dataclass(params)):
            raise ValueError(f"select.method {name!r}: params must be a dataclass, got {params!r}")
        declared = self.declared(but=name)
        for key, (hint, default) in _fields_of(params).items():
            if key == "method":
                raise ValueError(f"select.method: {name!r} declares a param of that name; expected another name")
            if default is dataclasses.MISSING:
                raise ValueError(f"select.{key}: {name!r} declares it without a default; expected one (params.yaml "
                                 "may leave the key out)")
            if key in declared and declared[key][:2] != (hint, default):
                other_hint, other_default, owner = declared[key]
                raise ValueError(f"select.{key}: {name!r} declares {hint} = {default!r}, but {owner!r} declares "
                                 f"{other_hint} = {other_default!r}; expected one type and one default")

    def declared(self, but: str | None = None) -> dict[str, tuple[Any, Any, str]]:
        """key -> (type, default, the first method declaring it) of every select.* key but `method` that a
        registered method (but `but`) declares, in registration order."""
        out: dict[str, tuple[Any, Any, str]] = {}
        for name, entry in self._entries.items():
            if name != but:
                for key, (hint, default) in _fields_of(entry.traits["params"]).items():
                    out.setdefault(key, (hint, default, name))
        return out

    def param_defaults(self) -> dict:
        """key -> default of every declared select.* key, in registration order."""
        return {key: default for key, (_, default, _) in self.declared().items()}

    def params_of(self, method: str, values: dict):
        """The params of `method` built from the keys of `values` that it declares (its defaults for the rest);
        a key that no registered method declares is one DQError line listing those that are."""
        declared = self.declared()
        unknown = [key for key in values if key not in declared]
        if unknown:
            raise DQError(f"select.{unknown[0]} is not a param of any registered {self.what}; expected one of "
                          f"{', '.join(declared)}")
        params = (self._entries.get(method) or self.get(method)).traits["params"]
        own = {f.name for f in dataclasses.fields(params)}
        return params(**{key: value for key, value in values.items() if key in own})

    def check_params(self, values: dict) -> None:
        """Build every registered method's params from `values`: each rule-checks the keys it declares."""
        for name in self._entries:
            self.params_of(name, values)
