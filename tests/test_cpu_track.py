"""benchmarks/cpu_track.py's figures: the crossing of the target on a val curve, and the paired
comparison of arms that the README's table of ideas is made of."""
import importlib.util
from types import SimpleNamespace

import pytest
from scipy import stats

from conftest import ROOT

spec = importlib.util.spec_from_file_location("cpu_track", ROOT / "benchmarks" / "cpu_track.py")
cpu_track = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpu_track)


def curve(*points):
    """A val curve: (step, loss, train seconds) per point."""
    return [SimpleNamespace(step=s, loss=loss, train_time_ms=1000 * t) for s, loss, t in points]


def test_target_is_crossed_between_the_straddling_points():
    val = curve((0, 4.2, 0.0), (10, 2.0, 1.0), (20, 1.90, 2.0), (30, 1.84, 3.5), (40, 1.70, 5.0))
    # 1.90 -> 1.84 crosses 1.88 a third of the way: step 23.33, 2.5 s
    assert cpu_track.to_target(val, cpu_track.steps) == pytest.approx(20 + 10 / 3)
    assert cpu_track.to_target(val, cpu_track.seconds) == pytest.approx(2.0 + 1.5 / 3)
    assert cpu_track.to_target(curve((0, 1.5, 0.0)), cpu_track.steps) == 0  # below from the start
    assert cpu_track.to_target(val[:3], cpu_track.steps) is None  # never reaches it


def test_paired_difference_is_scipys_paired_t_test():
    a, b = [1.84, 1.85, 1.86, 1.83], [1.83, 1.845, 1.84, 1.825]
    mean, std, p = cpu_track.paired(a, b)
    assert mean == pytest.approx(sum(b) / 4 - sum(a) / 4)
    assert p == pytest.approx(stats.ttest_rel(b, a).pvalue)
    assert cpu_track.paired([1.0, 2.0], [1.5, 2.5])[2] != cpu_track.paired([1.0, 2.0], [1.5, 2.5])[2]  # nan: no spread


def test_report_pairs_each_arm_with_the_first_by_seed():
    def run(final, crossing_step):
        return SimpleNamespace(val=curve((0, 4.0, 0.0), (crossing_step - 10, 1.9, crossing_step / 20),
                                         (crossing_step, 1.86, crossing_step / 10), (150, final, 15.0)))
    results = {"base": [run(1.84, 130), run(1.85, 140), run(1.86, 140)],
               "idea": [run(1.83, 120), run(1.845, 130), run(1.84, 120)],
               "worse": [SimpleNamespace(val=curve((0, 4.0, 0.0), (150, 1.90, 15.0)))]}  # one seed, above 1.88
    lines = []
    cpu_track.report(results, say=lines.append)
    assert lines[0].startswith("base: val_loss mean 1.8500") and "runs <= 1.88: 3/3" in lines[0]
    idea = next(line for line in lines if line.startswith("idea - base"))
    loss, _, p = cpu_track.paired([1.84, 1.85, 1.86], [1.83, 1.845, 1.84])
    assert f"val_loss {loss:+.4f}" in idea and f"p {p:.3g} (3 seeds)" in idea
    steps, _, p_steps = cpu_track.paired([130, 140, 140], [120, 130, 120])
    assert f"{steps:+.1f} steps" in idea and f"p {p_steps:.3g}" in idea and "over 3 pairs" in idea
    worse = next(line for line in lines if line.startswith("worse - base"))
    assert "(1 seeds)" in worse and "no pair in which both reach it" in worse
    assert worse.endswith("1 of 1 runs never reach 1.88")
