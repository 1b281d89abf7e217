"""Figure helpers shared by the per-run plots (`plots`) and the comparisons (`compare`).

* `ReadableLogLocator` / `readable_log_axis`: the major ticks of a log axis as plain numbers (20,
  0.3) that never run together ("90100"): the densest of 1-9, 1-2-5, 1-3 and 1 per decade (then
  every n-th decade) whose labels keep a gap at the axis's length when it is drawn, or a few
  evenly spaced ones when the axis spans too little for two log ticks; minor ticks unlabelled.
* `ev_limits` / `show_explained_variance`: an explained-variance axis from max(lowest value,
  `EV_FLOOR`) to at most 1; what lies below the floor (the start of training, a failed run) is
  said in the panel, so a curve from -3 to 0.9 does not squash the part that matters.
* `place_point_labels`: names next to scatter points, each where it overlaps no other text and no
  marker and stays inside the axes, moved further out with a leader line when the near places are
  taken; a name with no free place is left out (its point stays, the table names it).
* `freeze_layout`: run the constrained layout once and keep it, so labels placed afterwards are
  measured where they will be drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib
from matplotlib import ticker
from matplotlib.axis import XAxis
from matplotlib.font_manager import FontProperties
from matplotlib.text import Annotation, Text
from matplotlib.transforms import Bbox

EV_FLOOR = -0.1
"""Explained-variance axes start no lower than this (0 is predicting the mean)."""
LOG_SUBS = ((1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 5), (1, 3), (1,))
"""Tick multiples per decade, densest first."""
DIGIT_EM = 0.64
"""Width of a digit in the default font (DejaVu Sans), as a fraction of the font size."""
LABEL_GAP_PT = 6.0
"""Space kept between neighbouring tick labels."""


def plain(value: float) -> str:
    """A tick value as a plain number: 20, 0.3, 1500, 1e-05."""
    return f"{value:g}"


def _label_size_pt(axis: Any) -> float:
    params = matplotlib.rcParams
    size = params["xtick.labelsize"] if isinstance(axis, XAxis) else params["ytick.labelsize"]
    return float(FontProperties(size=size).get_size_in_points())


class ReadableLogLocator(ticker.Locator):
    """Major ticks of a log axis whose `plain` labels do not collide (module docstring)."""

    def __call__(self) -> Sequence[float]:
        if self.axis is None:
            return []
        low, high = self.axis.get_view_interval()
        return self.tick_values(low, high)

    def tick_values(self, vmin: float, vmax: float) -> Sequence[float]:
        low, high = sorted((float(vmin), float(vmax)))
        if not (0 < low < high and math.isfinite(high)):
            return ticker.LogLocator().tick_values(vmin, vmax)
        for ticks in log_tick_candidates(low, high):
            if len(ticks) >= 2 and self._fits(ticks, low, high):
                return ticks
        for bins in (4, 3, 2, 1):
            linear = ticker.MaxNLocator(bins, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high)
            inside = [float(t) for t in linear if low <= t <= high]
            if inside and self._fits(inside, low, high):
                return inside
        middle = float(f"{math.sqrt(low * high):.2g}")
        return [middle] if low <= middle <= high else [math.sqrt(low * high)]

    def _fits(self, ticks: Sequence[float], low: float, high: float) -> bool:
        """Neighbouring labels keep `LABEL_GAP_PT` between them along the (log) axis at its
        current length (6 ticks at most when the locator is not on an axis)."""
        axis = getattr(self, "axis", None)
        if axis is None or axis.axes is None:
            return len(ticks) <= 6
        horizontal = isinstance(axis, XAxis)
        box = axis.axes.bbox
        length_pt = (box.width if horizontal else box.height) * 72 / axis.axes.figure.dpi
        size = _label_size_pt(axis)

        def where(t: float) -> float:
            return length_pt * math.log(t / low) / math.log(high / low)

        def extent(t: float) -> float:
            return len(plain(t)) * DIGIT_EM * size if horizontal else 1.2 * size

        return all(
            where(b) - where(a) >= (extent(a) + extent(b)) / 2 + LABEL_GAP_PT
            for a, b in zip(ticks[:-1], ticks[1:], strict=True)
        )


def log_tick_candidates(low: float, high: float) -> list[list[float]]:
    """Tick sets inside [low, high], densest first: each of `LOG_SUBS`, then every 2nd, 3rd, ...
    decade."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    out = []
    for subs in LOG_SUBS:
        ticks = [float(f"{s}e{e}") for e in range(first, last + 1) for s in subs]
        out.append([t for t in ticks if low <= t <= high])
    decades = out[-1]
    out += [decades[::step] for step in range(2, len(decades))]
    return out


def readable_log_axis(axis: Any) -> None:
    """Readable major ticks on a log axis (call after `set_xscale("log")`, which resets them)."""
    axis.set_major_locator(ReadableLogLocator())
    axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: plain(value)))
    axis.set_minor_formatter(ticker.NullFormatter())


def ev_limits(values: Sequence[float], *, top: float | None = 1.0) -> tuple[float, float]:
    """y limits for explained variance: from max(lowest value, `EV_FLOOR`) to `top` (None: the
    highest value, at most 1), with a margin of 4% of the range on each side."""
    finite = [float(v) for v in values if math.isfinite(v)] or [0.0, 1.0]
    low = max(min(finite), EV_FLOOR)
    high = min(max(finite), 1.0) if top is None else top
    low = min(low, high)
    margin = 0.04 * max(high - low, 0.02)
    return low - margin, high + margin


def show_explained_variance(
    ax: Any, values: Sequence[float], *, top: float | None = 1.0, below: str = "start of training"
) -> bool:
    """Set an explained-variance y axis (`ev_limits`); when values lie below the floor, say so
    in the lower right corner ("<below> off scale: lowest -3.41"). Returns whether any did."""
    ax.set_ylim(*ev_limits(values, top=top))
    finite = [float(v) for v in values if math.isfinite(v)]
    clipped = bool(finite) and min(finite) < EV_FLOOR
    if clipped:
        ax.text(
            0.98,
            0.04,
            f"{below} off scale\n(below {EV_FLOOR:g}; lowest {min(finite):.3g})",
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=7,
            color="0.3",
        )
    return clipped


def freeze_layout(fig: Any) -> None:
    """Draw once so the layout engine places everything, then keep those positions."""
    fig.canvas.draw()
    fig.set_layout_engine("none")


MARKER_HALF_PT = 4.0
"""Half the side of the box a scatter marker (size 36, 6 pt across) occupies, with a margin."""
RINGS_PT = (5.0, 14.0, 26.0, 40.0, 60.0, 85.0)
"""Distances from its point at which a label is tried; beyond the first with a leader line."""
DIRECTIONS_DEG = (30, -30, 150, -150, 90, -90, 0, 180, 60, -60, 120, -120)


def _candidates() -> list[tuple[float, float, str, str, bool]]:
    """(dx, dy in points, ha, va, leader line) of each place to try, nearest first."""
    out = []
    for ring, radius in enumerate(RINGS_PT):
        for degrees in DIRECTIONS_DEG:
            dx = radius * math.cos(math.radians(degrees))
            dy = radius * math.sin(math.radians(degrees))
            ha = "left" if dx > 1 else "right" if dx < -1 else "center"
            va = "bottom" if dy > 1 else "top" if dy < -1 else "center"
            out.append((dx, dy, ha, va, ring > 0))
    return out


def text_extent(text: Text, renderer: Any) -> Bbox:
    """The window extent of the letters of `text` (an annotation's leader line left out)."""
    if isinstance(text, Annotation):
        text.update_positions(renderer)
    return Text.get_window_extent(text, renderer)


def overlaps(a: Bbox, b: Bbox, tolerance: float = 0.5) -> bool:
    """Whether two boxes share more than `tolerance` pixels in both directions."""
    return (
        min(a.x1, b.x1) - max(a.x0, b.x0) > tolerance
        and min(a.y1, b.y1) - max(a.y0, b.y0) > tolerance
    )


def _marker_boxes(ax: Any) -> list[Bbox]:
    half = MARKER_HALF_PT * ax.figure.dpi / 72
    boxes = []
    for collection in ax.collections:
        offsets = collection.get_offsets()
        if len(offsets):
            for x, y in collection.get_offset_transform().transform(offsets):
                boxes.append(Bbox.from_extents(x - half, y - half, x + half, y + half))
    return boxes


def place_point_labels(
    ax: Any, points: Sequence[tuple[float, float, str]], *, fontsize: float = 7
) -> list[str]:
    """Label each (x, y, name) in data coordinates where the name overlaps no text or marker and
    stays inside the axes (module docstring); call after `freeze_layout`. Returns the names left
    out for want of room."""
    renderer = ax.figure.canvas.get_renderer()
    inside = ax.get_window_extent(renderer).padded(-2)
    taken = [text_extent(t, renderer) for t in ax.texts if t.get_visible() and t.get_text()]
    if ax.get_legend() is not None:
        taken.append(ax.get_legend().get_window_extent(renderer))
    markers = _marker_boxes(ax)
    left_out = []
    for x, y, name in points:
        for dx, dy, ha, va, leader in _candidates():
            label = ax.annotate(
                name,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                ha=ha,
                va=va,
                fontsize=fontsize,
                annotation_clip=False,
                arrowprops=(
                    {"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 1, "shrinkB": 4}
                    if leader
                    else None
                ),
            )
            box = text_extent(label, renderer).padded(1)
            free = (
                inside.x0 <= box.x0
                and box.x1 <= inside.x1
                and inside.y0 <= box.y0
                and box.y1 <= inside.y1
                and not any(overlaps(box, other) for other in taken)
                and not any(overlaps(box, marker) for marker in markers)
            )
            if free:
                taken.append(box)
                break
            label.remove()
        else:
            left_out.append(name)
    return left_out
