"""Server-side SVG charts: one point per value, escaped text, sane with one point, flat
values or nothing at all."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from nextstate.proxy.dashboard.charts import Point, Series, line_chart

NS = "{http://www.w3.org/2000/svg}"


def circles(svg: str) -> list[ET.Element]:
    return list(ET.fromstring(svg).iter(f"{NS}circle"))


def test_each_value_is_one_point_of_its_series():
    svg = line_chart("loss", "loss", ["v1", "v2", "v3"], [
        Series("p", (Point(0, 1.0, "p@1"), Point(2, 0.5, "p@3"))),
        Series("p~al", (Point(1, 0.8, "p~al@2"),))])
    found = [(c.get("data-series"), c.get("data-label")) for c in circles(svg)]
    assert found == [("p", "p@1"), ("p", "p@3"), ("p~al", "p~al@2")]
    ys = [float(c.get("cy")) for c in circles(svg)[:2]]
    assert ys[0] < ys[1]  # a higher value is higher up
    assert ET.fromstring(svg).get("data-chart") == "loss"


def test_names_are_escaped():
    svg = line_chart("k", "<b>", ["v1"], [Series('a"<script>', (Point(0, 1.0, "&"),))])
    assert "<script>" not in svg and "<b>" not in svg
    [point] = circles(svg)
    assert point.get("data-series") == 'a"<script>' and point.get("data-label") == "&"


def test_one_point_flat_values_and_no_values_draw():
    assert len(circles(line_chart("k", "t", ["v1"], [Series("p", (Point(0, 2.0, "x"),))]))) == 1
    flat = line_chart("k", "t", ["v1", "v2"], [Series("p", (Point(0, 0.0, "a"),
                                                            Point(1, 0.0, "b")))])
    assert len(circles(flat)) == 2 and "nan" not in flat
    empty = line_chart("k", "t", [], [])
    assert circles(empty) == [] and "nothing to plot yet" in empty


def test_a_reference_line_is_drawn_and_in_range():
    svg = line_chart("kl", "kl", ["v1", "v2"], [Series("p", (Point(0, 0.1, "a"),
                                                             Point(1, 0.2, "b")))],
                     reference=(1.0, "publish gate"))
    assert "publish gate" in svg
    ys = [float(y) for y in re.findall(r'y1="([\d.]+)"', svg)]
    assert all(0 <= y <= 240 for y in ys)
