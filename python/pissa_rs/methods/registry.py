"""The methods by name: each method module registers itself, the engine looks them up; an
unknown name is refused with the list and the closest one."""

from __future__ import annotations

import difflib

from .base import Method

METHODS: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: one instance of `cls` under `cls.name`."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls()
    return cls


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> Method:
    """The method called `name`; a typo is named with the closest method and the list."""
    if name in METHODS:
        return METHODS[name]
    close = difflib.get_close_matches(str(name).lower(), METHODS, n=1)
    raise ValueError(f"unknown method {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                     + f" (the methods: {', '.join(method_names())})")
