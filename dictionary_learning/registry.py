"""The registry of dictionary classes, keyed by the class name written once.

``config.json`` records ``trainer.dict_class``; loading looks the name up here.
"""

from __future__ import annotations

DICTIONARY_CLASSES: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make ``cls`` loadable under its own name."""
    name = cls.__name__
    if name in DICTIONARY_CLASSES and DICTIONARY_CLASSES[name] is not cls:
        raise ValueError(f"a dictionary class named {name!r} is already registered")
    DICTIONARY_CLASSES[name] = cls
    return cls


def get_dictionary_class(name: str) -> type:
    try:
        return DICTIONARY_CLASSES[name]
    except KeyError:
        raise ValueError(
            f"unknown dictionary class {name!r}; known: {', '.join(sorted(DICTIONARY_CLASSES))}"
        ) from None
