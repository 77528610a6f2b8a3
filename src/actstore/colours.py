"""Colour scales shared by everything that draws (the HTML report, the browser viewer).

Signed values are drawn as Activation Lab draws them: matplotlib's RdBu_r at 11 stops,
negative blue, 0 white, positive red. The list is explicit because the name "RdBu" runs
blue -> red (grey middle) in plotly.js but red -> blue in plotly.py, so the name alone
reads either way.
"""

from __future__ import annotations

DIVERGING_SCALE = [
    [0.0, "rgb(5,48,97)"], [0.1, "rgb(32,101,171)"], [0.2, "rgb(67,147,195)"], [0.3, "rgb(144,196,221)"],
    [0.4, "rgb(209,229,240)"], [0.5, "rgb(247,246,246)"], [0.6, "rgb(253,219,199)"], [0.7, "rgb(243,164,129)"],
    [0.8, "rgb(214,96,77)"], [0.9, "rgb(177,24,43)"], [1.0, "rgb(103,0,31)"],
]  # fmt: skip
