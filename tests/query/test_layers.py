"""--layers text against captured layers: parsing, clipping, order, errors (worked by hand)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from actstore.errors import SelectionError
from actstore.query.layers import LayerChoice, choose_layers, common_layers, parse_layers


def test_parse_layers() -> None:
    assert parse_layers("all") is None and parse_layers(" ALL ") is None
    assert parse_layers("29-33") == [(29, 33)]
    assert parse_layers("0,5,10") == [(0, 0), (5, 5), (10, 10)]
    assert parse_layers(" 3 - 5 ,7") == [(3, 5), (7, 7)]
    assert parse_layers("4-4") == [(4, 4)]
    for bad in ("x", "1-", "-3", "1,,2", "1.5", "all,1", ""):
        with pytest.raises(SelectionError, match=rf"^--layers {bad!r}: use all, a range like 29-33, or a list like 0,5,10$"):
            parse_layers(bad)
    with pytest.raises(SelectionError, match=r"^--layers '0,5-3': range 5-3 runs backwards; write 3-5$"):
        parse_layers("0,5-3")


def test_choose_layers_clips_ranges_and_keeps_the_written_order() -> None:
    assert choose_layers("all", range(4)) == LayerChoice(None)
    assert choose_layers("28-99", range(30)) == LayerChoice([28, 29], "--layers 28-99: using [28, 29] (captured: 0-29)")
    assert choose_layers("0-99999999999", [1, 0]).layers == [0, 1]  # bounds, never expanded
    assert choose_layers("2-4", range(10)) == LayerChoice([2, 3, 4])  # all captured: no note
    assert choose_layers("4-4", range(10)) == LayerChoice([4])
    assert choose_layers("5,0-3,2", range(10)) == LayerChoice([5, 0, 1, 2, 3])  # as written, each once
    assert choose_layers("7,7", range(10)) == LayerChoice([7])
    assert choose_layers("3-5", [3, 5, 9]).note is not None  # 4 is missing: clipped
    assert choose_layers("0-1,1-2", range(3)) == LayerChoice([0, 1, 2])


def test_choose_layers_errors_name_the_captured_layers() -> None:
    with pytest.raises(SelectionError, match=r"^--layers 40-50: range 40-50 holds no captured layer; captured: 0-29$"):
        choose_layers("40-50", range(30))
    with pytest.raises(SelectionError, match=r"^--layers 3,31: layer 31 was not captured; captured: 0-29$"):
        choose_layers("3,31", range(30))


def test_common_layers() -> None:
    runs = [SimpleNamespace(layers=[3, 0, 1, 2]), SimpleNamespace(layers=[1, 2, 3, 4]), SimpleNamespace(layers=[2, 3, 1])]
    assert common_layers(runs) == [1, 2, 3]
    assert common_layers(runs[:1]) == [0, 1, 2, 3]
    assert common_layers([]) == []
