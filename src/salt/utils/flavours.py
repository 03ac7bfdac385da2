"""Jet class names and ftag's flavours, in one place: salt's short names (``b, c, u, tau``)
and ftag's (``bjets, cjets, ujets, taujets``) are the same classes, and a probability output
is named after ftag's flavour (``pb``), the name puma looks for."""

from __future__ import annotations

from ftag import Flavours, Label

SHORT_NAMES = {"b": "bjets", "c": "cjets", "u": "ujets", "tau": "taujets"}  # salt's class names


def flavour_of(class_name: str) -> Label | None:
    """The ftag flavour of a jet class: ``b`` or ``bjets`` -> ``Flavours["bjets"]``; None for
    a class ftag does not know."""
    name = SHORT_NAMES.get(class_name, class_name)
    # LabelContainer has no .get: its attributes are flavour names
    return Flavours[name] if name in Flavours else None  # noqa: SIM401


def canonical_name(class_name: str) -> str:
    """ftag's name of a class (``b`` and ``bjets`` -> ``bjets``); other names unchanged."""
    flavour = flavour_of(class_name)
    return flavour.name if flavour is not None else class_name


def probability_name(class_name: str) -> str:
    """``pb`` for class ``b`` or ``bjets`` (ftag's name); ``p<class>`` for other classes."""
    flavour = flavour_of(class_name)
    return flavour.px if flavour is not None else f"p{class_name}"
