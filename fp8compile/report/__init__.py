"""The precision plan as a table, DOT, SVG and a self-contained HTML page."""

from __future__ import annotations

__all__ = ["to_dot", "to_html", "to_svg"]


def to_dot(plan) -> str:
    raise NotImplementedError("graph rendering is not built yet")


def to_svg(plan, path=None) -> str:
    raise NotImplementedError("graph rendering is not built yet")


def to_html(plan, path=None) -> str:
    raise NotImplementedError("graph rendering is not built yet")
