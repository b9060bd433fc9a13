"""Does a config value fit a Python annotation? For checking builder options and Trainer arguments
before anything is built (an `image_size: abc` fails here, naming the key, not deep inside timm)."""

from __future__ import annotations

import collections.abc
import types
import typing
from typing import Any


def fits(value: Any, annotation: Any) -> bool:
    """True when `value` (plain YAML data: None, bool, int, float, str, list, dict) can be `annotation`.

    Understands Any, None, Union / `X | Y`, Optional, Literal, bool, int, float (ints fit), str,
    list / tuple / Sequence (elements checked when one element type is given) and dict / Mapping.
    Any other class fits nothing that YAML can write.
    """
    if annotation is Any or annotation is typing.Any:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    base = origin or annotation
    if base in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        element = args[0] if len(args) == 1 or (base is tuple and len(args) == 2 and args[1] is Ellipsis) else None
        return element is None or all(fits(v, element) for v in value)
    if base in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return False


def describe(annotation: Any) -> str:
    """A readable form of an annotation for messages (`int | None`, `list[int]`)."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "None")
