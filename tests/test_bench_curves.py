"""The arithmetic of bench/train_curves.py: FLOPs to a target bits/byte, efficiency gain."""
import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "train_curves.py"
_SPEC = importlib.util.spec_from_file_location("bench_train_curves", _PATH)
curves = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(curves)


def _points(*pairs: tuple[float, float]) -> list[dict[str, float]]:
    return [{"train_flops": f, "bits_per_byte": b} for f, b in pairs]


def test_flops_to_target_interpolates_between_the_points_around_the_crossing():
    points = _points((100.0, 4.0), (200.0, 3.0), (300.0, 2.0), (400.0, 2.5))
    # 2.5 lies a half of the way from 3.0 (200 FLOPs) to 2.0 (300 FLOPs)
    assert curves.flops_to_target(points, 2.5) == pytest.approx(250.0)
    # 3.8 lies a fifth of the way from 4.0 to 3.0
    assert curves.flops_to_target(points, 3.8) == pytest.approx(120.0)
    # exactly on a point: that point; the later rise back to 2.5 does not count
    assert curves.flops_to_target(points, 3.0) == pytest.approx(200.0)


def test_flops_to_target_edges():
    points = _points((100.0, 4.0), (200.0, 3.0))
    assert curves.flops_to_target(points, 5.0) == 100.0  # already below at the first point
    assert curves.flops_to_target(points, 2.9) is None  # never reached
    flat = _points((100.0, 4.0), (200.0, 3.0), (300.0, 3.0))
    assert curves.flops_to_target(flat, 3.0) == pytest.approx(200.0)


def test_efficiency_gain_of_the_means_and_over_seed_pairs():
    gain = curves.efficiency_gain([140.0, 160.0], [100.0, 125.0])
    assert gain["mean"] == pytest.approx(150.0 / 112.5 - 1.0)
    assert gain["min"] == pytest.approx(140.0 / 125.0 - 1.0)
    assert gain["max"] == pytest.approx(160.0 / 100.0 - 1.0)
    same = curves.efficiency_gain([100.0], [100.0])
    assert same == {"mean": 0.0, "min": 0.0, "max": 0.0}


def test_spread():
    assert curves.spread([3.0, 1.0, 2.0]) == {"mean": 2.0, "min": 1.0, "max": 3.0}
