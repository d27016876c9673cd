"""A small log-log line plot written with PIL (no plotting dependency): error versus NFE per solver."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000000", "#aa3377", "#66ccee", "#228833"]


def loglog_plot(series: dict[str, list[tuple[float, float]]], path, title: str, xlabel: str, ylabel: str,
                size=(1000, 700)) -> None:
    width, height = size
    left, right, top, bottom = 90, 230, 50, 70
    points = [(x, y) for values in series.values() for x, y in values if x > 0 and y > 0 and math.isfinite(y)]
    x_lo, x_hi = math.log10(min(p[0] for p in points)), math.log10(max(p[0] for p in points))
    y_lo, y_hi = math.floor(math.log10(min(p[1] for p in points))), math.ceil(math.log10(max(p[1] for p in points)))
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    def to_px(x, y):
        u = (math.log10(x) - x_lo) / max(x_hi - x_lo, 1e-9)
        v = (math.log10(y) - y_lo) / max(y_hi - y_lo, 1e-9)
        return left + u * (width - left - right), height - bottom - v * (height - top - bottom)

    for e in range(y_lo, y_hi + 1):  # horizontal grid at every decade
        _, py = to_px(10**x_lo, 10**e)
        draw.line([(left, py), (width - right, py)], fill="#dddddd")
        draw.text((10, py - 6), f"1e{e}", fill="black")
    for x in (5, 8, 10, 12, 16, 20, 25, 35, 50, 70, 100, 150, 200):
        if x_lo <= math.log10(x) <= x_hi:
            px, _ = to_px(x, 10**y_lo)
            draw.line([(px, top), (px, height - bottom)], fill="#eeeeee")
            draw.text((px - 8, height - bottom + 8), str(x), fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k, (name, values) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        pts = [to_px(x, y) for x, y in values if x > 0 and y > 0 and math.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for px, py in pts:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        draw.text((width - right + 10, top + 16 * k), name, fill=color)
    draw.text((left, 15), title, fill="black")
    draw.text(((width - right + left) // 2 - 40, height - 30), xlabel, fill="black")
    draw.text((10, top - 30), ylabel, fill="black")
    image.save(path)
