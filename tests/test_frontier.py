"""The sweep frontier report (``lit_align.frontier``): Pareto fronts and seed statistics against hand-computed values
and a brute-force reference, and the report of a sweep directory written here by hand in Lightning's CSV format."""

from __future__ import annotations

import csv
import json
import math
import random
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lit_align.frontier import (
    RunRecord,
    collect_runs,
    frontier_report,
    pareto_front,
    read_all_metric_columns,
    read_metric_columns,
    summarise,
    write_summary_table,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REWARD, KL, PPL = "eval_objective/scores", "eval_drift/kl_to_init", "eval_drift/perplexity"
KL_KNOB, RESET_KNOB = "model.init_args.kl_coef", "trainer.callbacks.init_args.reset_every"


# ---- Pareto front --------------------------------------------------------------------------------------------------


def test_pareto_front_on_hand_made_points():
    points = [(1, 1), (2, 2), (1.5, 3), (0.5, 0.5), (2, 2), (3, 5)]  # (reward, drift)
    # By drift: 3 (0.5, r 0.5) nothing to its left -> kept; 0 (1, r 1) beats 0.5 -> kept; 1 and 4 (2, r 2) identical,
    # beat 1 -> both kept; 2 (3, r 1.5) is dominated by 1 (more reward at less drift); 5 (5, r 3) beats 2 -> kept.
    assert pareto_front(points) == [3, 0, 1, 4, 5]


def test_pareto_front_edge_cases():
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]
    # equal drift: only the higher reward survives; equal reward: only the lower drift survives
    assert pareto_front([(1.0, 2.0), (3.0, 2.0)]) == [1]
    assert pareto_front([(1.0, 2.0), (1.0, 1.0)]) == [1]
    with pytest.raises(ValueError, match="point 1"):
        pareto_front([(1.0, 1.0), (math.nan, 0.0)])


def brute_force_front(points):
    def dominates(q, p):
        return q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1])

    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


@pytest.mark.parametrize("grid", [True, False], ids=["integer grid with ties", "continuous"])
def test_pareto_front_matches_a_brute_force_reference(grid):
    rng = random.Random(7)
    if grid:
        points = [(rng.randint(0, 12), rng.randint(0, 12)) for _ in range(200)]
    else:
        points = [(rng.gauss(0, 1), rng.expovariate(1.0)) for _ in range(200)]
    front = pareto_front(points)
    assert sorted(front) == brute_force_front(points)
    drifts = [points[i][1] for i in front]
    assert drifts == sorted(drifts)
    if grid:  # the grid makes identical front points, and all their copies are kept
        assert len({points[i] for i in front}) < len(front)


# ---- seed statistics ------------------------------------------------------------------------


def record(name, method="ppo", knobs=None, seed=0, status="done", **final) -> RunRecord:
    return RunRecord(
        name=name,
        method=method,
        knobs={"kl": 0.1} if knobs is None else knobs,
        seed=seed,
        status=status,
        wall_s=1.0,
        final=final,
        trajectory={},
        directory=Path(name),
    )


def test_summarise_pools_seeds_with_a_t_interval():
    runs = [
        record("a1", knobs={"kl": 0.1, "lr": 1e-5}, seed=1, r=1.0, d=2.0),
        record("a2", knobs={"kl": 0.1, "lr": 1e-5}, seed=2, r=2.0, d=4.0),
        record("a3", knobs={"lr": 1e-5, "kl": 0.1}, seed=3, r=3.0, d=6.0),  # same knobs, other key order
        record("a4", knobs={"kl": 0.1, "lr": 1e-5}, seed=4, status="failed", r=100.0, d=0.0),  # not done: ignored
        record("b1", knobs={"kl": 0.2, "lr": 1e-5}, seed=1, r=5.0, d=1.0),
        record("c1", method="dpo", knobs={}, r=7.0),  # no drift: skipped with a warning
    ]
    with pytest.warns(UserWarning, match=r"run 'c1'.*has no 'd'"):
        groups = summarise(runs, reward="r", drift="d")
    assert [(group.method, group.knobs, group.runs) for group in groups] == [
        ("ppo", {"kl": 0.1, "lr": 1e-5}, ["a1", "a2", "a3"]),
        ("ppo", {"kl": 0.2, "lr": 1e-5}, ["b1"]),
    ]
    pooled, single = groups
    assert pooled.n == 3
    # rewards 1, 2, 3: mean 2, s = 1, half-width t(0.975, 2)·1/√3 = 4.303/1.7321 = 2.484
    assert pooled.reward_mean == pytest.approx(2.0)
    assert pooled.reward_half_width == pytest.approx(2.484, abs=1e-3)
    # drifts 2, 4, 6: mean 4, s = 2, half-width 4.303·2/√3 = 4.969
    assert pooled.drift_mean == pytest.approx(4.0)
    assert pooled.drift_half_width == pytest.approx(4.969, abs=1e-3)
    assert single.n == 1 and single.reward_mean == 5.0 and single.drift_mean == 1.0
    assert math.isnan(single.reward_half_width) and math.isnan(single.drift_half_width)


def test_the_summary_table_gives_each_group_its_seed_mean_and_t_half_width(tmp_path):
    runs = [
        record("a1", knobs={"model.init_args.kl_coef": 0.1}, seed=1, r=1.0, ppl=10.0),
        record("a2", knobs={"model.init_args.kl_coef": 0.1}, seed=2, r=2.0, ppl=12.0),
        record("a3", knobs={"model.init_args.kl_coef": 0.1}, seed=3, r=3.0),  # no ppl: the mean of the other two
        record("a4", knobs={"model.init_args.kl_coef": 0.1}, seed=4, status="failed", r=100.0),
        record("b1", method="er", knobs={"trainer.callbacks": [{"class_path": "callbacks.ElasticReset"}]}, r=5.0),
    ]
    lines = write_summary_table(runs, ["r", "ppl", "absent"], tmp_path / "summary.md").read_text().splitlines()
    assert lines[0] == "| method | knobs | seeds | r | ppl | absent |"
    # r: 1, 2, 3 -> 2 ± 4.303·1/√3 = 2.484; ppl: 10, 12 -> 11 ± 12.706·1.4142/√2 = 12.706
    assert lines[2] == "| er | callbacks=ElasticReset | 1 | 5 | – | – |"  # by method, then knob values as numbers
    assert lines[3] == "| ppo | kl_coef=0.1 | 3 | 2 ± 2.5 | 11 ± 13 | – |"


# ---- reading metrics.csv -------------------------------------------------------------------------------------------


def write_metrics(path: Path, rows: list[dict]) -> Path:
    """A ``metrics.csv`` as Lightning's CSVLogger writes it: every row has every column, most cells empty."""
    columns = ["epoch", "step", *sorted({key for row in rows for key in row} - {"epoch", "step"})]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def logged(step: int, **metrics) -> list[dict]:
    """What one logging step leaves: a training row, then an evaluation row with the named metrics."""
    names = {"reward": REWARD, "kl": KL, "ppl": PPL}
    return [
        {"epoch": 0, "step": step, "train_loss": 1.0 / (step + 1)},
        {"epoch": 0, "step": step, **{names[key]: value for key, value in metrics.items()}},
    ]


def test_read_all_metric_columns_reads_every_metric_column(tmp_path):
    path = write_metrics(tmp_path / "metrics.csv", logged(0, reward=0.1, kl=0.0) + logged(5, reward=0.4))
    assert read_all_metric_columns(path) == {
        KL: {0: 0.0},
        REWARD: {0: 0.1, 5: 0.4},
        "train_loss": {0: 1.0, 5: 1.0 / 6},
    }
    assert read_metric_columns(path, [REWARD, "absent"]) == {REWARD: {0: 0.1, 5: 0.4}}


# ---- a sweep written by hand ---------------------------------------------------------------------------------------


def write_run(sweep: Path, name, method, knobs, seed, versions, status="done", evaluation=None) -> Path:
    run_dir = sweep / "runs" / name
    run_dir.mkdir(parents=True)
    info = {"name": name, "method": method, "knobs": knobs, "seed": seed, "status": status}
    if status != "running":  # lit_align.sweep records the wall time when a run ends
        info["wall_s"] = 12.5
    (run_dir / "run.json").write_text(json.dumps(info))
    for version, rows in enumerate(versions):
        write_metrics(run_dir / "logs" / method / f"version_{version}" / "metrics.csv", rows)
    if evaluation is not None:
        (run_dir / "evaluation.json").write_text(json.dumps(evaluation))
    return run_dir


def write_sweep(sweep: Path, perplexity: bool = True) -> Path:
    """Two methods × two knob values × two seeds, plus one run still going with a method of its own."""

    def steps(reward_at_20, kl_at_20):
        ppl = {"ppl": 10.0 + kl_at_20} if perplexity else {}
        return (
            logged(0, reward=0.1, kl=0.0)
            + logged(10, reward=0.3, kl=1.0)
            + logged(20, reward=reward_at_20, kl=kl_at_20, **ppl)
        )

    write_run(sweep, "ppo-kl0.05-s1", "ppo", {KL_KNOB: 0.05}, 1, [steps(0.8, 4.0)])
    resumed_first = logged(0, reward=0.1, kl=0.0) + logged(10, reward=0.3, kl=1.0) + logged(20, reward=0.5, kl=2.0)
    resumed_second = logged(20, reward=0.55, kl=2.5) + logged(30, reward=0.7)  # no KL logged at step 30
    write_run(sweep, "ppo-kl0.05-s2", "ppo", {KL_KNOB: 0.05}, 2, [resumed_first, resumed_second])
    write_run(sweep, "ppo-kl0.2-s1", "ppo", {KL_KNOB: 0.2}, 1, [steps(0.5, 1.5)])
    write_run(sweep, "ppo-kl0.2-s2", "ppo", {KL_KNOB: 0.2}, 2, [steps(0.6, 1.7)])
    write_run(
        sweep,
        "elastic-r10-s1",
        "ppo_elastic",
        {RESET_KNOB: 10},
        1,
        [steps(0.7, 1.0)],
        evaluation={REWARD: 0.99, "bleu": 31.2},
    )
    write_run(sweep, "elastic-r10-s2", "ppo_elastic", {RESET_KNOB: 10}, 2, [logged(0, reward=0.1)], status="failed")
    write_run(sweep, "elastic-r20-s1", "ppo_elastic", {RESET_KNOB: 20}, 1, [steps(0.75, 2.0)])
    write_run(sweep, "elastic-r20-s2", "ppo_elastic", {RESET_KNOB: 20}, 2, [steps(0.65, 1.8)])
    write_run(sweep, "grpo-s1", "grpo", {}, 1, [steps(0.9, 0.5)], status="running")
    return sweep


def test_the_frontier_is_also_drawn_against_task_scores(tmp_path):
    """``task_scores`` columns (higher is less tax) get their own reward-vs-score plot with a reversed x axis."""
    sweep = write_sweep(tmp_path / "sweep")
    with pytest.warns(UserWarning):
        written = frontier_report(sweep, task_scores=["bleu", "absent_score"])
    assert {"reward_vs_bleu.png", "reward_vs_bleu.svg"} <= set(written)
    assert_png(written["reward_vs_bleu.png"])
    assert "bleu (task score; reversed)" in svg_texts(written["reward_vs_bleu.svg"])
    assert not any("absent_score" in name for name in written)
    assert "| bleu |" in (sweep / "report" / "summary.md").read_text().splitlines()[0]


def test_collect_runs_reads_status_finals_and_trajectories(tmp_path):
    runs = {run.name: run for run in collect_runs(write_sweep(tmp_path / "sweep"))}
    assert len(runs) == 9
    assert runs["elastic-r10-s2"].status == "failed" and runs["grpo-s1"].status == "running"
    assert runs["grpo-s1"].wall_s is None  # a running run has no wall time yet

    plain = runs["ppo-kl0.05-s1"]
    assert (plain.method, plain.knobs, plain.seed, plain.wall_s) == ("ppo", {KL_KNOB: 0.05}, 1, 12.5)
    assert plain.directory == tmp_path / "sweep" / "runs" / "ppo-kl0.05-s1"
    assert plain.trajectory[REWARD] == {0: 0.1, 10: 0.3, 20: 0.8}
    assert plain.final == {REWARD: 0.8, KL: 4.0, PPL: 14.0, "train_loss": 1.0 / 21}

    # resumed: version_1 re-logged step 20 (0.55, 2.5) and wins there; KL's last step is 20, the reward's 30
    resumed = runs["ppo-kl0.05-s2"]
    assert resumed.trajectory[REWARD] == {0: 0.1, 10: 0.3, 20: 0.55, 30: 0.7}
    assert resumed.trajectory[KL] == {0: 0.0, 10: 1.0, 20: 2.5}
    assert resumed.final[REWARD] == 0.7 and resumed.final[KL] == 2.5
    assert PPL not in resumed.final

    # evaluation.json wins over the last logged value and adds its own metrics
    evaluated = runs["elastic-r10-s1"]
    assert evaluated.trajectory[REWARD][20] == 0.7
    assert evaluated.final[REWARD] == 0.99 and evaluated.final["bleu"] == 31.2 and evaluated.final[KL] == 1.0


def test_collect_runs_orders_versions_numerically(tmp_path):
    run_dir = write_run(tmp_path, "r", "ppo", {}, 0, [])
    write_metrics(run_dir / "logs" / "ppo" / "version_10" / "metrics.csv", logged(5, reward=2.0))
    write_metrics(run_dir / "logs" / "ppo" / "version_2" / "metrics.csv", logged(5, reward=1.0) + logged(6, reward=1.5))
    (run,) = collect_runs(tmp_path)
    assert run.trajectory[REWARD] == {5: 2.0, 6: 1.5}  # version_10 is the later one, not version_2


def test_collect_runs_finds_metrics_of_a_logger_the_config_renamed(tmp_path):
    """A method's config may name its own CSVLogger (``trainer.logger.init_args.name``): the run's metrics are still
    its metrics."""
    run_dir = write_run(tmp_path, "r", "ppo", {}, 0, [])
    write_metrics(run_dir / "controlled_science_ppo" / "version_0" / "metrics.csv", logged(3, reward=0.5))
    (run,) = collect_runs(tmp_path)
    assert run.trajectory[REWARD] == {3: 0.5} and run.final[REWARD] == 0.5


@pytest.mark.parametrize(
    "text, field",
    [
        ('{"name": "r", "method": "ppo", "knobs": {}, ', "not valid JSON"),
        ('{"name": "r", "method": "ppo", "knobs": {}, "status": "done", "wall_s": 1.0}', "'seed'"),
        ('{"name": "r", "method": "ppo", "knobs": [], "seed": 1, "status": "done", "wall_s": 1.0}', "'knobs'"),
    ],
    ids=["invalid JSON", "missing seed", "knobs not an object"],
)
def test_collect_runs_rejects_a_bad_run_json(tmp_path, text, field):
    path = tmp_path / "runs" / "r" / "run.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + re.escape(field)):
        collect_runs(tmp_path)


def test_collect_runs_rejects_a_non_numeric_evaluation(tmp_path):
    run_dir = write_run(tmp_path, "r", "ppo", {}, 0, [logged(0, reward=0.1)], evaluation={"bleu": "high"})
    with pytest.raises(ValueError, match=re.escape(str(run_dir / "evaluation.json")) + ".*'bleu'"):
        collect_runs(tmp_path)


def test_a_directory_without_runs_is_not_a_sweep(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        frontier_report(tmp_path / "nowhere")


def test_a_pending_run_is_skipped_quietly_and_a_stray_directory_with_a_warning(tmp_path):
    (tmp_path / "runs" / "pending").mkdir(parents=True)
    (tmp_path / "runs" / "pending" / "overrides.yaml").write_text("seed_everything: 0\n")  # prepared, not started
    (tmp_path / "runs" / "stray").mkdir()
    with pytest.warns(UserWarning) as caught:
        assert collect_runs(tmp_path) == []
    assert [str(w.message) for w in caught] == [
        f"{tmp_path / 'runs' / 'stray'}: no run.json; this directory is not reported"
    ]


# ---- the report ----------------------------------------------------------------------------------------------------


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 10_000, path  # drawn axes and markers, not an empty canvas


def svg_texts(path: Path) -> set[str]:
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    return {element.text.strip() for element in root.iter() if element.tag.endswith("text") and element.text}


def test_frontier_report_writes_every_file(tmp_path):
    sweep = write_sweep(tmp_path / "sweep")
    with pytest.warns(UserWarning, match=r"'ppo-kl0.05-s2'.*has no 'eval_drift/perplexity'"):  # the resumed run
        written = frontier_report(sweep)
    report = sweep / "report"
    expected = ["frontier.csv", "trajectories.csv", "summary.md"] + [
        f"{stem}.{suffix}"
        for stem in ("reward_vs_kl", "reward_vs_perplexity", "trajectories")
        for suffix in ("png", "svg")
    ]
    assert sorted(written) == sorted(expected)
    assert all(written[name] == report / name and written[name].is_file() for name in expected)
    for stem in ("reward_vs_kl", "reward_vs_perplexity", "trajectories"):
        assert_png(report / f"{stem}.png")
        texts = svg_texts(report / f"{stem}.svg")
        assert {"ppo", "ppo_elastic"} <= texts  # one legend entry per method of the done runs...
        assert "grpo" not in texts  # ...and none for the run that is still going

    with (report / "frontier.csv").open(newline="") as file:
        reader = csv.DictReader(file)
        header, rows = reader.fieldnames, {row["run"]: row for row in reader}
    assert header == [
        "run",
        "method",
        "seed",
        "status",
        "wall_s",
        KL_KNOB,
        RESET_KNOB,
        "bleu",
        KL,
        PPL,
        REWARD,
        "train_loss",
    ]
    assert len(rows) == 9
    assert rows["ppo-kl0.2-s2"] == {
        "run": "ppo-kl0.2-s2",
        "method": "ppo",
        "seed": "2",
        "status": "done",
        "wall_s": "12.5",
        KL_KNOB: "0.2",
        RESET_KNOB: "",
        "bleu": "",
        KL: "1.7",
        PPL: "11.7",
        REWARD: "0.6",
        "train_loss": str(1.0 / 21),
    }
    assert rows["elastic-r10-s1"][REWARD] == "0.99" and rows["elastic-r10-s1"]["bleu"] == "31.2"
    assert rows["elastic-r10-s1"][RESET_KNOB] == "10" and rows["elastic-r10-s1"][KL_KNOB] == ""
    assert rows["elastic-r10-s2"]["status"] == "failed" and rows["grpo-s1"]["status"] == "running"
    assert rows["grpo-s1"]["wall_s"] == ""

    with (report / "trajectories.csv").open(newline="") as file:
        trajectory_rows = list(csv.reader(file))
    assert trajectory_rows[0] == ["run", "method", "seed", "step", "metric", "value"]
    assert ["ppo-kl0.05-s2", "ppo", "2", "20", REWARD, "0.55"] in trajectory_rows
    assert ["ppo-kl0.05-s2", "ppo", "2", "30", REWARD, "0.7"] in trajectory_rows
    # one plain run: reward, KL and train_loss at steps 0, 10, 20, perplexity at step 20
    assert sum(row[0] == "ppo-kl0.05-s1" for row in trajectory_rows) == 3 + 3 + 3 + 1


def test_frontier_report_without_perplexity_warns_and_skips_that_plot(tmp_path):
    sweep = write_sweep(tmp_path / "sweep", perplexity=False)
    with pytest.warns(UserWarning, match=re.escape(PPL)):
        written = frontier_report(sweep, out_dir=tmp_path / "elsewhere")
    assert "reward_vs_perplexity.png" not in written and "reward_vs_perplexity.svg" not in written
    assert not list((tmp_path / "elsewhere").glob("reward_vs_perplexity*"))
    assert written["reward_vs_kl.png"] == tmp_path / "elsewhere" / "reward_vs_kl.png"
    assert_png(written["reward_vs_kl.png"])
