"""Plots drawn as inline SVG from numbers, for the HTML reports: nothing to load when the page is
viewed (no script, no font, no network). Three shapes: intervals (a value and its 95 % interval
per row), bars, and lines over time with shaded bands behind them (phases, holds)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

PALETTE = ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b83280", "#4a5568")
_FONT = 'font-family="system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif"'
_LABEL_WIDTH = 200


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def ticks(low: float, high: float, *, count: int = 5) -> list[float]:
    """About `count` round values from `low` to `high`."""
    if not math.isfinite(low) or not math.isfinite(high) or high <= low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if raw <= step * m)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step + 1e-9) + 1)]


def _number(x: float) -> str:
    if abs(x) >= 1e6:
        return f"{x / 1e6:g}M"
    if abs(x) >= 1e4:
        return f"{x / 1e3:g}k"
    return f"{x:g}"


def _svg(width: int, height: int, body: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}" {_FONT} font-size="12">'
            f'<title>{_e(title)}</title>' + "".join(body) + "</svg>")


def intervals(rows: Sequence[tuple[str, float, float, float]], *, title: str, low: float = 0.0,
              high: float = 1.0, width: int = 680) -> str:
    """Per row (label, value, low, high): a dot at the value and a bar across its interval."""
    plot = width - _LABEL_WIDTH - 70  # room for the value written after the interval
    height = 40 + 28 * len(rows)

    def x(v: float) -> float:
        return _LABEL_WIDTH + plot * (min(max(v, low), high) - low) / (high - low)

    body = []
    for t in ticks(low, high):
        body.append(f'<line x1="{x(t):.1f}" y1="12" x2="{x(t):.1f}" y2="{height - 24}" stroke="#e2e8f0"/>'
                    f'<text x="{x(t):.1f}" y="{height - 8}" text-anchor="middle" fill="#4a5568">{t:g}</text>')
    for i, (label, value, lo, hi) in enumerate(rows):
        y = 26 + 28 * i
        colour = PALETTE[i % len(PALETTE)]
        body.append(f'<text x="{_LABEL_WIDTH - 10}" y="{y + 4}" text-anchor="end">{_e(label)}</text>')
        if math.isfinite(value):
            body.append(f'<line x1="{x(lo):.1f}" y1="{y}" x2="{x(hi):.1f}" y2="{y}" stroke="{colour}" '
                        f'stroke-width="6" stroke-linecap="round" opacity="0.35"/>'
                        f'<circle cx="{x(value):.1f}" cy="{y}" r="5" fill="{colour}"/>'
                        f'<text x="{x(hi) + 8:.1f}" y="{y + 4}" fill="#2d3748">{value:.3f}</text>')
        else:
            body.append(f'<text x="{_LABEL_WIDTH}" y="{y + 4}" fill="#718096">not measured</text>')
    return _svg(width, height, body, title)


def bars(rows: Sequence[tuple[str, float, str]], *, title: str, width: int = 680) -> str:
    """Per row (label, value, the text written after the bar)."""
    plot = width - _LABEL_WIDTH - 140
    height = 16 + 28 * len(rows)
    top = max([v for _, v, _ in rows if math.isfinite(v)] + [0.0]) or 1.0
    body = []
    for i, (label, value, said) in enumerate(rows):
        y = 10 + 28 * i
        length = plot * max(value, 0.0) / top if math.isfinite(value) else 0.0
        body.append(f'<text x="{_LABEL_WIDTH - 10}" y="{y + 13}" text-anchor="end">{_e(label)}</text>'
                    f'<rect x="{_LABEL_WIDTH}" y="{y}" width="{max(length, 1):.1f}" height="18" rx="3" '
                    f'fill="{PALETTE[i % len(PALETTE)]}"/>'
                    f'<text x="{_LABEL_WIDTH + length + 8:.1f}" y="{y + 13}" fill="#2d3748">{_e(said)}</text>')
    return _svg(width, height, body, title)


def lines(series: Sequence[tuple[str, Sequence[tuple[float, float]]]], *, title: str, x_label: str, y_label: str,
          bands: Sequence[tuple[float, float, str, str]] = (), width: int = 760, height: int = 280) -> str:
    """Each series (label, [(x, y), ...]) as a line; `bands` (x0, x1, label, colour) shaded behind."""
    left, right, top, bottom = 70, 20, 28, 44
    points = [p for _, s in series for p in s]
    xs = [p[0] for p in points] + [b[0] for b in bands] + [b[1] for b in bands]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    x1 = x1 if x1 > x0 else x0 + 1.0
    y1 = max([p[1] for p in points] + [0.0]) * 1.1 or 1.0

    def px(v: float) -> float:
        return left + (width - left - right) * (v - x0) / (x1 - x0)

    def py(v: float) -> float:
        return height - bottom - (height - top - bottom) * v / y1

    body = []
    for b0, b1, label, colour in bands:
        body.append(f'<rect x="{px(b0):.1f}" y="{top}" width="{max(px(b1) - px(b0), 1.5):.1f}" '
                    f'height="{height - top - bottom}" fill="{colour}" opacity="0.18">'
                    f'<title>{_e(label)}</title></rect>')
    for t in ticks(0.0, y1):
        body.append(f'<line x1="{left}" y1="{py(t):.1f}" x2="{width - right}" y2="{py(t):.1f}" stroke="#e2e8f0"/>'
                    f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end" fill="#4a5568">{_number(t)}</text>')
    for t in ticks(x0, x1):
        body.append(f'<text x="{px(t):.1f}" y="{height - bottom + 16}" text-anchor="middle" '
                    f'fill="#4a5568">{_number(t)}</text>')
    body.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 8}" text-anchor="middle" '
                f'fill="#2d3748">{_e(x_label)}</text>'
                f'<text x="14" y="{(top + height - bottom) / 2:.0f}" text-anchor="middle" fill="#2d3748" '
                f'transform="rotate(-90 14 {(top + height - bottom) / 2:.0f})">{_e(y_label)}</text>')
    for i, (label, s) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        if len(s) > 1:
            path = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in s)
            body.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        body += [f'<circle cx="{px(a):.1f}" cy="{py(b):.1f}" r="2.5" fill="{colour}"/>' for a, b in s]
        body.append(f'<text x="{left + 8 + 160 * i}" y="{top - 10}" fill="{colour}">{_e(label)}</text>')
    return _svg(width, height, body, title)
