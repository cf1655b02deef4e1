"""Learning-curve plots: the EMA, seed grouping and band on hand-computed numbers, then plot_runs on
small hand-written run folders (the image, the summary, and each user error)."""
import json

import numpy as np
import pytest
import yaml

from policygrad.curves import PlotError, band, default_x, ema, group_name, plot_runs, series

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(root, name, rows, task=None, tail=""):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"env": "CartPole-v1", "task": task, "seed": 1}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return run


def control_rows(returns, every=100):
    """One row per update; `eval/return_mean` only on the rows given a number (None: no eval)."""
    rows = []
    for i, ret in enumerate(returns, start=1):
        row = {"update": i, "step": i, "env_steps": i * every, "train/episode_return_mean": 10.0 * i}
        if ret is not None:
            row["eval/return_mean"] = ret
        rows.append(row)
    return rows


def test_ema_is_debiased_like_tensorboard():
    # w=0.5: acc = 0.5, 1.25, 2.125; debias 1-0.5**n = 0.5, 0.75, 0.875
    assert ema([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 5 / 3, 17 / 7])
    assert ema([4.0, -1.0, 7.0], 0.0) == [4.0, -1.0, 7.0]
    assert ema([], 0.9) == []


@pytest.mark.parametrize("name, group", [
    ("ppo-seed1", "ppo"), ("ppo-seed2", "ppo"), ("pr_s3", "pr"), ("run-seed=4", "run"),
    ("run_seed-12", "run"), ("PPO-Seed7", "PPO"), ("ppo-seed1-lr3e-4", "ppo-lr3e-4"),
    ("cartpole.s2.clip", "cartpole.clip"), ("seed5", "seed*"),
    ("ppo", "ppo"), ("ppo-s1000steps", "ppo-s1000steps"), ("gpt2s1", "gpt2s1"), ("lr3e-4", "lr3e-4"),
])
def test_group_name_strips_only_a_seed_token(name, group):
    assert group_name(name) == group


def test_band_uses_x_common_to_all_runs():
    curves = [([0, 10, 20], [1.0, 2.0, 3.0]),
              ([0, 10, 20, 30], [3.0, 4.0, 5.0, 6.0]),  # longer run: x=30 is not in every run
              ([0, 5, 10, 20], [2.0, 9.0, 0.0, 4.0])]   # extra point x=5 likewise
    x, mean, lo, hi = band(curves)
    np.testing.assert_allclose(x, [0, 10, 20])
    np.testing.assert_allclose(mean, [2.0, 2.0, 4.0])
    np.testing.assert_allclose(lo, [1.0, 0.0, 3.0])
    np.testing.assert_allclose(hi, [3.0, 4.0, 5.0])


def test_band_without_common_x_is_empty():
    x, mean, lo, hi = band([([0, 10], [1.0, 2.0]), ([5, 15], [1.0, 2.0])])
    assert len(x) == len(mean) == len(lo) == len(hi) == 0


def test_series_skips_missing_null_and_nonfinite_and_keeps_last_of_a_repeated_x():
    rows = [{"step": 1, "m": 1.0}, {"step": 2}, {"step": 3, "m": None}, {"step": 4, "m": float("nan")},
            {"step": None, "m": 5.0}, {"step": 5, "m": True}, {"step": 6, "m": 2.0},
            {"step": 6, "m": 3.0}]  # a resumed run logs step 6 again
    assert series(rows, "step", "m") == ([1, 6], [1.0, 3.0])


def test_default_x_is_step_for_language_model_runs_and_env_steps_for_control(tmp_path):
    assert default_x(make_run(tmp_path, "lm", [], task="positive-review")) == "step"
    assert default_x(make_run(tmp_path, "cp", [])) == "env_steps"


def test_seed_runs_form_one_band_and_a_lone_run_a_line(tmp_path):
    runs = [make_run(tmp_path, "ppo-seed1", control_rows([None, 20.0, None, 40.0])),
            make_run(tmp_path, "ppo-seed2", control_rows([None, 30.0, None, 50.0])),
            make_run(tmp_path, "a2c_s1", control_rows([5.0, 6.0]))]
    out = tmp_path / "figs" / "deep" / "curves.png"  # parent folders are created
    summary = plot_runs(runs, "eval/return_mean", out, smooth=0.0)
    assert summary == {"out": str(out), "groups": {"ppo": 2, "a2c": 1}, "points": 6, "skipped": []}
    assert out.read_bytes().startswith(PNG)
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temp file left behind


def test_runs_without_the_metric_are_skipped_and_pdf_is_written(tmp_path):
    cp = make_run(tmp_path, "cp", control_rows([1.0, 2.0]))
    lm = make_run(tmp_path, "lm", [{"update": 1, "step": 1, "eval/reward_mean": 0.5}], task="positive-review")
    summary = plot_runs([cp, lm], "eval/return_mean", tmp_path / "c.pdf")
    assert summary["skipped"] == [str(lm)] and summary["groups"] == {"cp": 1}
    assert (tmp_path / "c.pdf").read_bytes().startswith(b"%PDF")


def test_truncated_last_line_is_skipped(tmp_path):
    run = make_run(tmp_path, "killed", control_rows([1.0, 2.0]), tail='{"update": 3, "env_steps": 300, "eval/ret')
    summary = plot_runs([run], "eval/return_mean", tmp_path / "c.png")
    assert summary["points"] == 2
    assert (tmp_path / "c.png").read_bytes().startswith(PNG)


def test_x_override(tmp_path):
    run = make_run(tmp_path, "cp", control_rows([1.0, 2.0]))
    assert plot_runs([run], "eval/return_mean", tmp_path / "c.svg", x="update")["points"] == 2
    with pytest.raises(PlotError, match="with a finite 'time/elapsed_s'"):
        plot_runs([run], "eval/return_mean", tmp_path / "c.svg", x="time/elapsed_s")


def raises_one_line(match, *args, **kwargs):
    with pytest.raises(PlotError, match=match) as info:
        plot_runs(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_folder_or_metrics_file_is_a_plot_error(tmp_path):
    raises_one_line("'.*nope' does not exist", [tmp_path / "nope"], "eval/return_mean", tmp_path / "c.png")
    (tmp_path / "empty").mkdir()
    raises_one_line("has no metrics.jsonl", [tmp_path / "empty"], "eval/return_mean", tmp_path / "c.png")
    raises_one_line("no run folders", [], "eval/return_mean", tmp_path / "c.png")


def test_unknown_metric_lists_the_metrics_that_exist(tmp_path):
    run = make_run(tmp_path, "cp", control_rows([1.0, None]))
    msg = raises_one_line("'eval/reward_mean' is in none of the runs", [run], "eval/reward_mean",
                          tmp_path / "c.png")
    assert msg.endswith("metrics found: eval/return_mean, train/episode_return_mean")
    assert not (tmp_path / "c.png").exists()


def test_unknown_metric_lists_at_most_ten(tmp_path):
    run = make_run(tmp_path, "cp", [{"env_steps": 1, **{f"m/{i:02d}": 1.0 for i in range(15)}}])
    msg = raises_one_line("none of the runs", [run], "eval/x", tmp_path / "c.png")
    assert msg.endswith("m/00, m/01, m/02, m/03, m/04, m/05, m/06, m/07, m/08, m/09, ...")


@pytest.mark.parametrize("smooth", [1.0, -0.1, 1.5])
def test_smooth_outside_unit_interval_is_a_plot_error(tmp_path, smooth):
    run = make_run(tmp_path, "cp", control_rows([1.0]))
    raises_one_line(r"--smooth .* outside \[0, 1\)", [run], "eval/return_mean", tmp_path / "c.png", smooth=smooth)


def test_unwritable_suffix_is_a_plot_error(tmp_path):
    run = make_run(tmp_path, "cp", control_rows([1.0]))
    raises_one_line(r"unsupported suffix '\.xyz'; use one of \.png", [run], "eval/return_mean",
                    tmp_path / "c.xyz")
    raises_one_line("unsupported suffix ''", [run], "eval/return_mean", tmp_path / "curves")


def test_seeds_with_no_common_x_are_a_plot_error(tmp_path):
    a = make_run(tmp_path, "ppo-seed1", control_rows([1.0, 2.0], every=100))
    b = make_run(tmp_path, "ppo-seed2", control_rows([1.0, 2.0], every=70))
    raises_one_line("group 'ppo' share no env_steps values", [a, b], "eval/return_mean", tmp_path / "c.png")


def test_several_metrics_go_into_one_figure_a_line_per_run_and_metric(tmp_path):
    """A learned proxy reward and the rule it learnt from, side by side; a run lacking one is
    named with the metric it lacks."""
    rows = [{"update": i, "step": i, "eval/reward/rm": 0.1 * i, "eval/reward/vader": 0.05 * i} for i in (1, 2, 3)]
    proxy_only = [{"update": 1, "step": 1, "eval/reward/rm": 0.2}]
    runs = [make_run(tmp_path, "rl", rows, task="t"), make_run(tmp_path, "other", proxy_only, task="t")]
    summary = plot_runs(runs, ["eval/reward/rm", "eval/reward/vader"], tmp_path / "c.png", smooth=0.0)
    assert summary["groups"] == {"rl: eval/reward/rm": 1, "rl: eval/reward/vader": 1, "other: eval/reward/rm": 1}
    assert summary["points"] == 7 and summary["skipped"] == [f"{runs[1]} (eval/reward/vader)"]
    assert (tmp_path / "c.png").read_bytes().startswith(PNG)
