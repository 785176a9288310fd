"""The sim-to-real benchmark's counting and statistics on small synthetic inputs (no training)."""

import json

import pytest

from benchmarks.sim2real import (
    Point,
    bootstrap_ci,
    first_reaching,
    flywheel_curve,
    load_results,
    main,
    parse_seeds,
    ratio_ci,
    save_results,
    summarise,
    table,
)


def test_first_reaching_takes_the_first_point_at_or_above_the_threshold():
    curve = [Point(1000, 3200, 0.2), Point(2000, 6400, 0.9), Point(3000, 9600, 1.0)]
    assert first_reaching(curve, 0.9) == Point(2000, 6400, 0.9)
    assert first_reaching(curve, 1.0).train == 3000
    assert first_reaching(curve[:1], 0.9) is None
    assert first_reaching([], 0.9) is None


@pytest.mark.parametrize("curve, message", [
    ([Point(2000, 10, 0.1), Point(1000, 20, 0.2)], "cumulative"),
    ([Point(0, 10, 1.5)], "success must be in"),
    ([Point(-1, 0, 0.5)], ">= 0"),
])
def test_first_reaching_refuses_curves_that_cannot_be_counts(curve, message):
    with pytest.raises(ValueError, match=message):
        first_reaching(curve, 0.9)


def test_first_reaching_refuses_a_threshold_outside_0_1():
    with pytest.raises(ValueError, match="threshold"):
        first_reaching([Point(0, 0, 1.0)], 0.0)


def test_bootstrap_ci_brackets_the_mean_and_collapses_on_equal_values():
    mean, lo, hi = bootstrap_ci([1000, 2000, 3000, 4000, 5000])
    assert mean == 3000 and 1000 <= lo < mean < hi <= 5000
    assert bootstrap_ci([7.0, 7.0, 7.0]) == (7.0, 7.0, 7.0)
    assert bootstrap_ci([1, 9], seed=3) == bootstrap_ci([1, 9], seed=3)      # reproducible


@pytest.mark.parametrize("values", [[], [1.0, float("inf")], [[1.0, 2.0]]])
def test_bootstrap_ci_refuses_empty_or_non_finite_values(values):
    with pytest.raises(ValueError, match="bootstrap_ci"):
        bootstrap_ci(values)


def test_summarise_says_how_many_seeds_reached():
    assert summarise([1000, 1000, 1000]) == "1.0k [1.0k, 1.0k]"
    assert summarise([1000, None, 3000]).endswith("(2/3 reached)")
    assert summarise([None, None]) == "not reached (0/2)"


def test_ratio_ci_needs_every_seed_to_reach():
    r = ratio_ci([100, 100], [1000, 1000])
    assert r == pytest.approx((0.1, 0.1, 0.1))
    assert ratio_ci([100, None], [1000, 1000]) is None


def test_flywheel_curve_reads_the_lap_metrics_and_sums_evaluation(tmp_path):
    for lap, (total, success) in enumerate([(1000, 0.0), (2000, 0.5), (3000, 0.95)]):
        d = tmp_path / "laps" / f"lap_{lap:03d}"
        d.mkdir(parents=True)
        metrics = {"reality/transitions_total": total, "reality/eval_transitions": 3200,
                   "capability/success_rate": success}
        (d / "metrics.json").write_text(json.dumps({"lap": lap, "metrics": metrics}))
    (tmp_path / "laps" / "lap_003").mkdir()
    (tmp_path / "laps" / "lap_003" / "metrics.json").write_text(json.dumps({"lap": 3, "metrics": {}}))  # unfinished
    curve = flywheel_curve(tmp_path)
    assert curve == [Point(1000, 3200, 0.0), Point(2000, 6400, 0.5), Point(3000, 9600, 0.95)]
    assert first_reaching(curve, 0.9).train == 3000


def test_table_reports_per_seed_counts_and_the_ratio():
    results = {"pendulum": {
        "flywheel": {"1000": [Point(1000, 100, 0.5), Point(2000, 200, 1.0)], "2000": [Point(2000, 100, 0.95)]},
        "ppo-reality": {"1000": [Point(20000, 100, 0.95)], "2000": [Point(30000, 100, 0.2), Point(40000, 200, 0.9)]},
        "ppo-engine": {"1000": [Point(0, 100, 0.1)], "2000": [Point(0, 100, 0.3)]},
    }}
    text = table(results, 0.9)
    assert "| pendulum | flywheel | 1000,2000 | 2.0k, 2.0k | 2.0k [2.0k, 2.0k] | 200, 100 | 1.00, 0.95 |" in text
    assert "| pendulum | ppo-engine | 1000,2000 | >0, >0 | not reached (0/2) |" in text
    assert "flywheel / ppo-reality = 0.067" in text and "goal <= 0.1: met" in text


@pytest.mark.parametrize("text", ["1000,x", "-1", "5,5"])
def test_parse_seeds_names_the_bad_seed(text):
    with pytest.raises(ValueError, match="--seeds"):
        parse_seeds(text)


def test_cli_refuses_bad_arguments_before_running(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--seeds", "10,ten", "--out", str(tmp_path)])
    assert "'ten'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--quick", "--tasks", "cartpole", "--out", str(tmp_path)])
    assert "no quick setting" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--tasks", "walker"])
    assert not (tmp_path / "results.json").exists()


def test_results_keep_their_gap_and_a_changed_gap_drops_the_runs_that_used_it(tmp_path):
    path = tmp_path / "results.json"
    runs = {"cartpole": {"flywheel": {"1": [Point(2000, 100, 1.0)]}, "ppo-engine": {"1": [Point(0, 100, 0.0, 0.95)]},
                         "ppo-reality": {"1": [Point(90000, 100, 0.95)]}}}
    save_results(path, runs, {"cartpole": {"gain_scale": 0.7}})
    assert load_results(path, {"cartpole": {"gain_scale": 0.7}}) == runs          # same gap: all kept, engine success too
    said = []
    kept = load_results(path, {"cartpole": {"gain_scale": 1.43}}, say=said.append)
    assert kept == {"cartpole": {"ppo-reality": runs["cartpole"]["ppo-reality"]}}  # reality runs do not use the gap
    assert len(said) == 2 and all("gain_scale" in s and "dropping" in s for s in said)


def test_the_table_shows_the_engine_only_policy_in_its_own_engine():
    results = {"cartpole": {"ppo-engine": {"1": [Point(0, 100, 0.0, 0.4), Point(0, 200, 0.06, 0.91)]}}}
    assert "| 0.06 (engine 0.91) |" in table(results, 0.9)


def test_a_corrupt_results_file_is_one_line_and_kept(capsys, tmp_path):
    (tmp_path / "results.json").write_text('{"gaps": {}, "tasks": {"cartpole": {"flywheel": {"1": [{"train": 1')
    with pytest.raises(SystemExit):
        main(["--tasks", "cartpole", "--out", str(tmp_path)])
    assert "is not a sim2real results file" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text().endswith('"train": 1')


def test_changed_flywheel_settings_drop_only_the_flywheel_runs(tmp_path):
    path = tmp_path / "results.json"
    gap = {"cartpole": {"gain_scale": 0.7}}
    runs = {"cartpole": {"flywheel": {"1": [Point(2000, 100, 1.0)]}, "ppo-reality": {"1": [Point(90000, 100, 0.95)]}}}
    save_results(path, runs, gap, {"cartpole": ("simulator.fidelity=0.5",)})
    assert load_results(path, gap, flywheel={"cartpole": ("simulator.fidelity=0.5",)}) == runs
    said = []
    kept = load_results(path, gap, say=said.append, flywheel={"cartpole": ("world_model.base=engine",)})
    assert kept == {"cartpole": {"ppo-reality": runs["cartpole"]["ppo-reality"]}}
    assert len(said) == 1 and "simulator.fidelity=0.5" in said[0] and "world_model.base=engine" in said[0]


def test_per_seed_ratio_bounds_where_one_side_did_not_reach():
    from benchmarks.sim2real import seed_ratio

    assert seed_ratio(5000, 5000, 88000, 88000) == ("0.057", True)
    assert seed_ratio(6000, 6000, None, 200000) == ("<0.030", True)     # PPO needed more than the 200k it spent
    assert seed_ratio(None, 14000, 120000, 120000) == (">0.117", False)
    assert seed_ratio(None, 4000, 120000, 120000) == (">0.033", None)   # a lower bound under the goal decides nothing
    assert seed_ratio(None, 4000, None, 1000) == ("n/a", None)


def test_the_table_gives_a_verdict_per_seed():
    results = {"cartpole": {"flywheel": {"1": [Point(5000, 10, 1.0)], "2": [Point(6000, 10, 0.95)]},
                            "ppo-reality": {"1": [Point(88000, 10, 0.95)], "2": [Point(200000, 10, 0.03)]}}}
    text = table(results, 0.9)
    assert "cartpole: per seed (1, 2): 0.057, <0.030 (goal <= 0.1: met on every seed)" in text
    assert "n/a (not every seed reached the threshold)" in text
