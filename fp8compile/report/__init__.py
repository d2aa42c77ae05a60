"""The precision plan as DOT, SVG and a self-contained HTML page, and its precision conflicts.

Example::

    >>> p = fp8compile.plan(model, x)          # doctest: +SKIP
    >>> p.to_html("plan.html")                  # doctest: +SKIP  (open it in a browser)
    >>> conflicts(p)                            # doctest: +SKIP
"""

from __future__ import annotations

from .conflicts import conflicts
from .dot import to_dot
from .html import to_html
from .svg import to_svg

__all__ = ["conflicts", "to_dot", "to_html", "to_svg"]
