"""A name -> builder registry (timm's `register_model`, SAM's `sam_model_registry`), one type for all.

Encoders, token reducers, enhancers, projectors and conversation templates each have one `Registry`.
It answers `names()`, `get(name)`, `options(name)` (the builder's keyword arguments, read from its
signature) and `build(name, *inputs, **options)`; validation, error messages and tests derive every
list of names from it, so a new entry needs nothing but its registration.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Any, Callable, Iterable


class Registry:
    """Named builders of one kind.

    Args:
        kind: what the entries build, for messages ("encoder", "projector", ...).
        inputs: leading builder arguments that the caller passes, not the config (e.g. the wrapped
            encoder of a reducer, the widths of a projector); they are not `options`.
        prefix: a family prefix such as "timm:": `get("timm:vit_base_patch16_224")` returns the entry
            registered as "timm:" with its first argument bound to the rest of the name.
    """

    def __init__(self, kind: str, inputs: Iterable[str] = (), prefix: str | None = None) -> None:
        self.kind = kind
        self.inputs = tuple(inputs)
        self.prefix = prefix
        self._entries: dict[str, Any] = {}

    def register(self, name: str, entry: Any = None) -> Callable:
        """`@registry.register("name")` on a builder, or `registry.register("name", entry)`."""

        def add(fn: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            return fn

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> None:
        """Remove `name` (a plugin that is unloaded, a test's temporary entry)."""
        self.get(name)
        del self._entries[name]

    def names(self) -> list[str]:
        """Registered names, sorted; a prefix family appears as its prefix (e.g. "timm:")."""
        return sorted(self._entries)

    def choices(self) -> str:
        """The valid names as a message shows them."""
        return ", ".join(n + "<name>" if n == self.prefix else n for n in self.names())

    def __contains__(self, name: str) -> bool:
        try:
            self._resolve(name)
        except KeyError:
            return False
        return True

    def _resolve(self, name: str) -> tuple[Any, tuple]:
        if not isinstance(name, str):
            raise KeyError(name)
        if self.prefix is not None and name.startswith(self.prefix) and name != self.prefix:
            return self._entries[self.prefix], (name[len(self.prefix) :],)
        if name not in self._entries or name == self.prefix:
            raise KeyError(name)
        return self._entries[name], ()

    def get(self, name: str) -> Any:
        """The entry registered as `name`; an unknown name raises ValueError listing the valid ones."""
        try:
            entry, bound = self._resolve(name)
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of: {self.choices()}") from None
        return functools.partial(entry, *bound) if bound else entry

    def options(self, name: str) -> list[str]:
        """Keyword arguments the builder of `name` takes from a config block (inputs and bound names left out)."""
        entry, bound = self._resolve_or_raise(name)
        params = list(inspect.signature(entry).parameters.values())[len(bound) :]
        return [
            p.name
            for p in params
            if p.name not in self.inputs and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY)
        ]

    def hints(self, name: str) -> dict[str, Any]:
        """The builder's resolved type annotations by option name (what a config value must be)."""
        entry, _ = self._resolve_or_raise(name)
        target = entry.__init__ if inspect.isclass(entry) else entry
        try:
            hints = typing.get_type_hints(target)
        except Exception:  # an annotation that does not resolve: no type check for this builder
            return {}
        return {k: v for k, v in hints.items() if k in self.options(name)}

    def check_options(self, name: str, options: Iterable[str]) -> None:
        """ValueError naming the unknown options of `name` and the valid ones."""
        valid = self.options(name)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"{self.kind} {name!r} got unknown option(s) {unknown}; valid options: {valid}")

    def build(self, name: str, *inputs: Any, **options: Any) -> Any:
        """Call the builder of `name` with the caller's `inputs` and the config's `options` (checked)."""
        self.check_options(name, options)
        entry, bound = self._resolve_or_raise(name)
        return entry(*bound, *inputs, **options)

    def _resolve_or_raise(self, name: str) -> tuple[Any, tuple]:
        self.get(name)  # raises the readable error
        return self._resolve(name)
