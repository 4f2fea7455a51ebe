"""One colour, marker and line style per method, the same in every plot of a report, no two colours alike.

Colours are compared in OKLab/OKLCh (Ottosson 2020: a perceptual space whose hue angle stays even
in the blues, unlike CIELAB's). Two colours are near-duplicates when they are closer than
``MIN_DISTANCE`` in OKLab, or both have colour (chroma ≥ ``CHROMATIC``) and their hues lie within
``MIN_HUE`` degrees: a light and a dark version of one hue read as one colour ("both green"), which
is what ``tab20``'s pairs are (hues 1–13° apart). The palette is ``tab10`` less its brown (red's
hue, 5° away), then periwinkle, bronze, berry and teal in the hue gaps, and grey and black last
(the plots draw the Pareto front grey and the zero of the relative plot black). Methods take the
colours in sorted order; past the 14 colours they repeat with dashed, then dotted lines, and the
markers (7 shapes) differ as well.
"""

from __future__ import annotations

import math

PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#e377c2", "#bcbd22", "#17becf",  # tab10, no brown/grey
    "#6a79f7",  # periwinkle (xkcd cornflower)
    "#a87900",  # bronze
    "#990f4b",  # berry
    "#029386",  # teal
    "#7f7f7f",  # grey
    "#000000",  # black
)
#: no two colours of the palette are closer than this in OKLab (0.02 is about the smallest visible difference)
MIN_DISTANCE = 0.1
#: two colours with chroma at least CHROMATIC must differ in hue by at least MIN_HUE degrees (OKLCh)
CHROMATIC, MIN_HUE = 0.04, 20.0
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", ":")  # one per round through the palette


def _ordered(methods) -> list[str]:
    return sorted(set(methods))


def colors(methods) -> dict[str, str]:
    """One colour per method: sorted names take the palette in order."""
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(_ordered(methods))}


def markers(methods) -> dict[str, str]:
    """One marker shape per method, in the colours' order."""
    return {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(_ordered(methods))}


def linestyles(methods) -> dict[str, str]:
    """Solid lines for the first round of colours, then dashed, then dotted."""
    return {m: LINESTYLES[min(i // len(PALETTE), len(LINESTYLES) - 1)] for i, m in enumerate(_ordered(methods))}


# -- comparing colours ---------------------------------------------------------------------
def oklab(color: str) -> tuple[float, float, float]:
    """OKLab (L in 0..1) of a ``#rrggbb`` colour."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(int(color[i:i + 2], 16) / 255) for i in (1, 3, 5))
    l = 0.4122214708 * r + 0.5363325363 * g + 0.0514459929 * b  # noqa: E741 - the space's own name (LMS)
    m = 0.2119034982 * r + 0.6806995451 * g + 0.1073969566 * b
    s = 0.0883024619 * r + 0.2817188376 * g + 0.6299787005 * b
    l, m, s = (math.copysign(abs(v) ** (1 / 3), v) for v in (l, m, s))  # noqa: E741
    return (0.2104542553 * l + 0.7936177850 * m - 0.0040720468 * s,
            1.9779984951 * l - 2.4285922050 * m + 0.4505937099 * s,
            0.0259040371 * l + 0.7827717662 * m - 0.8086757660 * s)


def oklch(color: str) -> tuple[float, float, float]:
    """(lightness, chroma, hue in degrees)."""
    lightness, a, b = oklab(color)
    return lightness, math.hypot(a, b), math.degrees(math.atan2(b, a)) % 360


def hue_difference(a: str, b: str) -> float:
    """Degrees between two colours' hues (0..180)."""
    d = abs(oklch(a)[2] - oklch(b)[2]) % 360
    return min(d, 360 - d)


def near_duplicates(a: str, b: str) -> bool:
    """Whether a reader would take two line colours for one: too close, or two versions of one hue."""
    if math.dist(oklab(a), oklab(b)) < MIN_DISTANCE:
        return True
    return min(oklch(a)[1], oklch(b)[1]) >= CHROMATIC and hue_difference(a, b) < MIN_HUE
