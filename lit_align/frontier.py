"""The reward–drift frontier report of a sweep directory.

Noukhovitch et al. (2023, "Language Model Alignment with Elastic Reset") compare alignment methods not by reward
alone but by the trade-off between the reward they reach and the drift they pay for it (KL to the initial model,
perplexity, a forgetting score): a method is better when it reaches a higher reward at the same drift, i.e. when its
Pareto front lies above and to the left of another's. This module turns a sweep into that comparison.

A sweep directory (written by ``lit_align.sweep``) holds one directory per run::

    runs/<run>/run.json            {"name", "method", "knobs": {dotted override key: value}, "seed", "status", "wall_s"}
    runs/<run>/**/metrics.csv      CSVLogger output: "step", "epoch" and one sparse column per metric
    runs/<run>/evaluation.json     optional final scores {"metric": number} from ``lit-align evaluate``

``frontier_report(sweep_dir)`` reads every run (``collect_runs``), writes one row per run (``frontier.csv``) and
every logged value in long format (``trajectories.csv``), pools the seeds of each (method, knobs) group into a mean
with a 95 % Student-t confidence interval (``summarise``), and draws reward vs drift with each method's Pareto front
(``plot_frontier``, ``pareto_front``) and the training curves (``plot_trajectories``). Runs that are not ``done`` are
listed in the CSVs with their status but never plotted or summarised.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib import colormaps, rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lit_align.intervals import mean_interval

# ---- reading metrics.csv ----------------------------------------------------------------------------------------

INDEX_COLUMNS = ("step", "epoch")


def _number(text: str | None) -> float | None:
    """A finite float from a CSV cell, or ``None`` for an empty or non-numeric one."""
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _read_columns(
    path: str | os.PathLike[str], choose: Callable[[list[str]], list[str]]
) -> dict[str, dict[int, float]]:
    """``{column: {step: value}}`` for the columns ``choose(header)`` picks; the last value logged at a step wins."""
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        wanted = choose(list(reader.fieldnames or ()))
        series: dict[str, dict[int, float]] = {name: {} for name in wanted}
        for row in reader:
            step = _number(row.get("step"))
            if step is None:
                continue
            for name in wanted:
                value = _number(row.get(name))
                if value is not None:
                    series[name][int(step)] = value
    return series


def read_metric_columns(path: str | os.PathLike[str], columns: Iterable[str]) -> dict[str, dict[int, float]]:
    """``{column: {step: value}}`` from a ``metrics.csv`` for the columns it has (the last value logged at a step
    wins); columns absent from the header are left out."""

    def present(header: list[str]) -> list[str]:
        known = set(header)
        return [name for name in columns if name in known]

    return _read_columns(path, present)


def read_all_metric_columns(path: str | os.PathLike[str]) -> dict[str, dict[int, float]]:
    """``{column: {step: value}}`` for every column of a ``metrics.csv`` except ``step`` and ``epoch``."""
    return _read_columns(path, lambda header: [name for name in header if name not in INDEX_COLUMNS])


# ---- collecting the runs of a sweep ------------------------------------------------------------------------------

RUN_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "method": (str,),
    "knobs": (dict,),
    "seed": (int,),
    "status": (str,),
    "wall_s": (int, float, type(None)),
}
OPTIONAL_RUN_FIELDS = {"wall_s"}  # ``lit_align.sweep`` writes the wall time when a run ends, not while it runs


@dataclass
class RunRecord:
    """One run of a sweep: what ``run.json`` says, its final scores and every logged value.

    ``final`` holds, for each metric column, the value at the largest step it was logged, overridden and extended
    by ``evaluation.json``; ``trajectory`` is ``{column: {step: value}}`` over all of the run's ``metrics.csv``.
    """

    name: str
    method: str
    knobs: dict[str, Any]
    seed: int
    status: str
    wall_s: float | None
    final: dict[str, float]
    trajectory: dict[str, dict[int, float]]
    directory: Path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def _read_run_json(path: Path) -> dict[str, Any]:
    """``run.json`` checked field by field; a bad one raises ``ValueError`` naming the file and the field. Only
    ``wall_s`` may be absent (or null): it then reads as ``None``."""
    info = _read_json(path)
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(info).__name__}")
    for field_name, types in RUN_FIELDS.items():
        if field_name not in info and field_name not in OPTIONAL_RUN_FIELDS:
            raise ValueError(f"{path}: missing field {field_name!r}")
        value = info.get(field_name)
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join("null" if kind is type(None) else kind.__name__ for kind in types)
            raise ValueError(f"{path}: field {field_name!r} must be {expected}, got {value!r}")
    return info


def _read_evaluation(path: Path) -> dict[str, float]:
    """``evaluation.json`` as ``{metric: float}``; anything but a finite number raises, naming the file and key."""
    scores = _read_json(path)
    if not isinstance(scores, dict):
        raise ValueError(f"{path}: expected a JSON object of metric scores, got {type(scores).__name__}")
    for key, value in scores.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{path}: metric {key!r} must be a finite number, got {value!r}")
    return {key: float(value) for key, value in scores.items()}


def _natural_key(path: Path) -> list[Any]:
    """Sort key comparing the digit runs of a path as numbers, so ``version_2`` comes before ``version_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


def _read_trajectory(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every ``metrics.csv`` in the run's directory (``logs/``, or wherever a config's own logger name put it)
    merged in version order: a resumed run's later version wins at a step both logged."""
    files = sorted(run_dir.rglob("metrics.csv"), key=lambda path: _natural_key(path.relative_to(run_dir)))
    trajectory: dict[str, dict[int, float]] = {}
    for path in files:
        for column, values in read_all_metric_columns(path).items():
            trajectory.setdefault(column, {}).update(values)
    return trajectory


def collect_runs(sweep_dir: str | os.PathLike[str]) -> list[RunRecord]:
    """Every run under ``<sweep_dir>/runs``, in directory-name order, whatever its status.

    A run directory without ``run.json`` is skipped with a warning; a ``run.json`` that is not valid JSON or lacks a
    field raises ``ValueError`` naming the file and the field. A ``done`` run without any ``metrics.csv`` is kept
    (its ``final`` may still come from ``evaluation.json``) with a warning.
    """
    runs_dir = Path(sweep_dir) / "runs"
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: not a sweep directory (no runs/ directory in it)")
    records = []
    for run_dir in sorted(path for path in runs_dir.iterdir() if path.is_dir()):
        if not (run_dir / "run.json").is_file():
            if not (run_dir / "overrides.yaml").is_file():  # prepared by lit_align.sweep but not started: pending
                warnings.warn(f"{run_dir}: no run.json; this directory is not reported", stacklevel=2)
            continue
        info = _read_run_json(run_dir / "run.json")
        trajectory = _read_trajectory(run_dir)
        if not trajectory and info["status"] == "done":
            warnings.warn(f"{run_dir}: run {info['name']!r} is done but has no metrics.csv", stacklevel=2)
        final = {column: values[max(values)] for column, values in trajectory.items() if values}
        if (run_dir / "evaluation.json").is_file():
            final.update(_read_evaluation(run_dir / "evaluation.json"))
        records.append(
            RunRecord(
                name=info["name"],
                method=info["method"],
                knobs=info["knobs"],
                seed=info["seed"],
                status=info["status"],
                wall_s=None if info.get("wall_s") is None else float(info["wall_s"]),
                final=final,
                trajectory=trajectory,
                directory=run_dir,
            )
        )
    return records


# ---- CSV tables ----------------------------------------------------------------------------------------------------

RUN_COLUMNS = ("run", "method", "seed", "status", "wall_s")


def _cell(value: Any) -> str:
    """A CSV cell: strings as they are, ``None`` empty, anything else as JSON (``0.1``, ``true``, ``[1, 2]``)."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def write_frontier_csv(runs: Sequence[RunRecord], path: str | os.PathLike[str]) -> Path:
    """One row per run: ``run, method, seed, status, wall_s``, one column per knob key (sorted; empty where a run
    lacks the knob), then one column per final metric (sorted by name)."""
    knob_keys = sorted({key for run in runs for key in run.knobs})
    metrics = sorted({name for run in runs for name in run.final})
    header = [*RUN_COLUMNS, *knob_keys, *metrics]
    clashes = sorted({name for name in header if header.count(name) > 1})
    if clashes:
        raise ValueError(f"frontier.csv columns {clashes} are both a knob and a run field or metric; rename the knob")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for run in runs:
            writer.writerow(
                [run.name, run.method, run.seed, run.status, _cell(run.wall_s)]
                + [_cell(run.knobs.get(key)) for key in knob_keys]
                + [_cell(run.final.get(name)) for name in metrics]
            )
    return path


def write_trajectories_csv(runs: Sequence[RunRecord], path: str | os.PathLike[str]) -> Path:
    """Every logged value in long format: ``run, method, seed, step, metric, value`` (per run, metric, step)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["run", "method", "seed", "step", "metric", "value"])
        for run in runs:
            for metric in sorted(run.trajectory):
                for step, value in sorted(run.trajectory[metric].items()):
                    writer.writerow([run.name, run.method, run.seed, step, metric, _cell(value)])
    return path


# ---- Pareto front ------------------------------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated ``(reward, drift)`` points, reward maximised and drift minimised, sorted by drift
    ascending (then index).

    A point is dominated when another has reward >= and drift <= with at least one strict; identical points do not
    dominate each other, so all copies of a front point are kept. O(n log n): sort by drift, then sweep once keeping
    the best reward seen at strictly smaller drift — at one drift only the highest reward can survive, and it does
    when it beats that best.
    """
    for index, (reward, drift) in enumerate(points):
        if math.isnan(reward) or math.isnan(drift):
            raise ValueError(f"pareto_front: point {index} is {points[index]!r}; NaN cannot be ranked")
    order = sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0], i))
    front: list[int] = []
    best_reward = -math.inf  # the highest reward among points of strictly smaller drift
    for _, same_drift in itertools.groupby(order, key=lambda i: points[i][1]):
        group = list(same_drift)
        top = points[group[0]][0]  # the group is sorted by reward descending
        if top > best_reward:
            front.extend(i for i in group if points[i][0] == top)
            best_reward = top
    return front


# ---- seed statistics ---------------------------------------------------------------------------------------------


def mean_and_half_width(values: Sequence[float]) -> tuple[float, float]:
    """Mean and 95 % Student-t half-width t_{0.975, n−1} · s / √n (s: sample std, ddof = 1) over seeds
    (:func:`lit_align.intervals.mean_interval`); the half-width is NaN for a single value."""
    estimate = mean_interval(values)
    return estimate.value, estimate.high - estimate.value


@dataclass
class GroupSummary:
    """The seeds of one (method, knobs) group pooled: per-run values, means and 95 % half-widths."""

    method: str
    knobs: dict[str, Any]
    runs: list[str]
    rewards: list[float]
    drifts: list[float]
    reward_mean: float
    reward_half_width: float
    drift_mean: float
    drift_half_width: float

    @property
    def n(self) -> int:
        return len(self.runs)


def group_done_runs(runs: Iterable[RunRecord]) -> dict[tuple[str, str], list[RunRecord]]:
    """The ``done`` runs by (method, knobs as sorted JSON): one group per setting, its seeds in it."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for run in runs:
        if run.status == "done":
            groups.setdefault((run.method, json.dumps(run.knobs, sort_keys=True)), []).append(run)
    return groups


def summarise(runs: Sequence[RunRecord], reward: str, drift: str) -> list[GroupSummary]:
    """Pool the seeds of the ``done`` runs by (method, knobs), sorted by method then knobs.

    A done run without a final ``reward`` or ``drift`` value is left out with a warning naming the run and column.
    """
    complete = []
    for run in runs:
        if run.status != "done":
            continue
        missing = [column for column in (reward, drift) if column not in run.final]
        if missing:
            names = " and ".join(repr(column) for column in missing)
            warnings.warn(f"run {run.name!r} ({run.directory}) has no {names}; left out of the summary", stacklevel=2)
            continue
        complete.append(run)
    groups = group_done_runs(complete)
    summaries = []
    for (method, _), members in sorted(groups.items()):
        rewards = [run.final[reward] for run in members]
        drifts = [run.final[drift] for run in members]
        reward_mean, reward_half_width = mean_and_half_width(rewards)
        drift_mean, drift_half_width = mean_and_half_width(drifts)
        summaries.append(
            GroupSummary(
                method=method,
                knobs=members[0].knobs,
                runs=[run.name for run in members],
                rewards=rewards,
                drifts=drifts,
                reward_mean=reward_mean,
                reward_half_width=reward_half_width,
                drift_mean=drift_mean,
                drift_half_width=drift_half_width,
            )
        )
    return summaries


# ---- plots -------------------------------------------------------------------------------------------------------


def knob_label(knobs: dict[str, Any]) -> str:
    """``kl_coef=0.1``, callback blocks by class and arguments (as run directory names), ``-`` for no knobs."""
    from lit_align.sweep import short_value

    return ", ".join(f"{key.split('.')[-1]}={short_value(value)}" for key, value in knobs.items()) or "-"


def write_summary_table(runs: Sequence[RunRecord], columns: Sequence[str], path: str | os.PathLike[str]) -> Path:
    """``summary.md``: one Markdown row per (method, knobs) over the ``done`` runs: the number of seeds and, per
    column, the mean over seeds ± the 95 % Student-t half-width (``mean_and_half_width``; "–" where no run has it)."""
    groups = group_done_runs(runs)
    lines = [
        "| method | knobs | seeds | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]

    def order(item: tuple[tuple[str, str], list[RunRecord]]) -> tuple:  # by method, then numeric knobs as numbers
        (method, _), members = item
        values = members[0].knobs.values()
        return method, [(0, v, "") if isinstance(v, (int, float)) else (1, 0, json.dumps(v)) for v in values]

    for (method, _), members in sorted(groups.items(), key=order):
        cells = []
        for column in columns:
            values = [run.final[column] for run in members if column in run.final]
            if not values:
                cells.append("–")
                continue
            mean, half_width = mean_and_half_width(values)
            cells.append(f"{mean:.4g}" if math.isnan(half_width) else f"{mean:.4g} ± {half_width:.2g}")
        row = [method, knob_label(members[0].knobs), str(len(members)), *cells]
        lines.append("| " + " | ".join(row) + " |")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _method_colours(methods: Iterable[str]) -> dict[str, Any]:
    palette = colormaps["tab10"].colors
    return {method: palette[i % len(palette)] for i, method in enumerate(sorted(set(methods)))}


def _save(figure: Figure, path_stem: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``<path_stem>.png`` and ``<path_stem>.svg`` through the Agg canvas (no pyplot, no global backend change); SVG
    text stays text and carries no date, so it can be edited and diffed."""
    FigureCanvasAgg(figure)
    png, svg = Path(f"{path_stem}.png"), Path(f"{path_stem}.svg")
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=150)
    with rc_context({"svg.fonttype": "none"}):
        figure.savefig(svg, metadata={"Date": None})
    return png, svg


def _no_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


def plot_frontier(
    runs: Sequence[RunRecord],
    reward: str,
    drift: str,
    path_stem: str | os.PathLike[str],
    *,
    xlabel: str | None = None,
    ylabel: str | None = None,
    drift_is_a_score: bool = False,
) -> tuple[Path, Path]:
    """Reward (y) vs drift (x) of the ``done`` runs, the Elastic Reset comparison: per (method, knobs) group the
    seed mean with 95 % error bars on both axes (none for a single seed), each seed as a faint dot, and each method's
    Pareto front over its group means as a step line. Writes ``<path_stem>.png`` and ``.svg``; returns both paths.
    ``drift_is_a_score``: the x column is a task score kept by staying close (SST-2 accuracy: higher is less tax);
    the Pareto front then maximises it and the x axis is reversed, so less tax is still on the left."""
    groups = summarise(runs, reward, drift)
    colours = _method_colours(run.method for run in runs)  # every run's method: the same colours in every plot
    figure = Figure(figsize=(7.5, 5.5))
    axis = figure.subplots()
    for method in sorted({group.method for group in groups}):
        members = [group for group in groups if group.method == method]
        for i, group in enumerate(members):
            axis.scatter(group.drifts, group.rewards, s=12, color=colours[method], alpha=0.3, linewidths=0)
            axis.errorbar(
                group.drift_mean,
                group.reward_mean,
                xerr=_no_nan(group.drift_half_width),
                yerr=_no_nan(group.reward_half_width),
                fmt="o",
                color=colours[method],
                elinewidth=1,
                alpha=0.8,
                capsize=3,
                label=method if i == 0 else None,
            )
        sign = -1.0 if drift_is_a_score else 1.0
        points = [(group.reward_mean, sign * group.drift_mean) for group in members]
        front = [members[i] for i in pareto_front(points)]
        axis.step(
            [group.drift_mean for group in front],
            [group.reward_mean for group in front],
            where="post",  # the best reward reachable at each drift: flat until the next front point
            color=colours[method],
            linestyle="--",
            linewidth=2,
            zorder=3,
        )
    if not groups:
        warnings.warn(f"plot_frontier: no done run has both {reward!r} and {drift!r}; the plot is empty", stacklevel=2)
    axis.set_xlabel(xlabel or drift)
    axis.set_ylabel(ylabel or reward)
    if drift_is_a_score:
        axis.invert_xaxis()
    axis.set_title("reward vs drift: seed mean ± 95 % CI, seeds faint, Pareto front per method", fontsize=10)
    axis.grid(alpha=0.3)
    if groups:
        axis.legend(title="method")
    figure.tight_layout()
    return _save(figure, path_stem)


def plot_trajectories(
    runs: Sequence[RunRecord], reward: str, drift: str, path_stem: str | os.PathLike[str]
) -> tuple[Path, Path]:
    """Two panels, ``reward`` vs step and ``drift`` vs step, one line per ``done`` run coloured by its method.
    Writes ``<path_stem>.png`` and ``.svg``; returns both paths."""
    done = sorted((run for run in runs if run.status == "done"), key=lambda run: run.method)  # legend in method order
    colours = _method_colours(run.method for run in runs)
    figure = Figure(figsize=(12, 4.5))
    axes = figure.subplots(1, 2)
    for axis, column in zip(axes, (reward, drift), strict=True):
        labelled: set[str] = set()
        for run in done:
            values = run.trajectory.get(column, {})
            steps = sorted(values)
            label = None
            if steps and run.method not in labelled:  # one legend entry per method
                label = run.method
                labelled.add(run.method)
            axis.plot(steps, [values[step] for step in steps], color=colours[run.method], alpha=0.8, label=label)
        axis.set_xlabel("step")
        axis.set_ylabel(column)
        axis.set_title(f"{column} vs step" if labelled else f"{column}: not logged by any done run")
        axis.grid(alpha=0.3)
        if labelled:
            axis.legend(title="method")
    figure.tight_layout()
    return _save(figure, path_stem)


# ---- the report --------------------------------------------------------------------------------------------------


def frontier_report(
    sweep_dir: str | os.PathLike[str],
    reward: str = "eval_objective/scores",
    drift: str = "eval_drift/kl_to_init",
    perplexity: str = "eval_drift/perplexity",
    out_dir: str | os.PathLike[str] | None = None,
    trajectory_reward: str | None = None,
    trajectory_drift: str | None = None,
    table: Sequence[str] = (),
    task_scores: Sequence[str] = (),
) -> dict[str, Path]:
    """Write the sweep's report into ``out_dir`` (default ``<sweep_dir>/report``) and return the paths by file name:
    ``frontier.csv``, ``trajectories.csv``, ``reward_vs_kl.{png,svg}``, ``trajectories.{png,svg}`` and, when some
    done run has a final ``perplexity`` value, ``reward_vs_perplexity.{png,svg}`` (otherwise a warning).
    ``trajectory_reward`` / ``trajectory_drift``: the training-log columns the trajectories show (default: ``reward``
    and ``drift``; e.g. ``objective/scores`` and ``objective/kl`` when the frontier is drawn from ``evaluation.json``,
    which has no steps). ``task_scores``: columns of task scores (higher is less tax, e.g. ``sst2_accuracy``), each
    drawn as ``reward_vs_<column>.{png,svg}`` (the frontier as reward vs task score). ``summary.md``
    (:func:`write_summary_table`) tabulates reward, drift, perplexity, the task scores and the ``table`` columns per
    method and knobs over seeds."""
    runs = collect_runs(sweep_dir)
    if not runs:
        warnings.warn(f"{sweep_dir}: no runs under runs/; the report is empty", stacklevel=2)
    out = Path(sweep_dir) / "report" if out_dir is None else Path(out_dir)
    written = [
        write_frontier_csv(runs, out / "frontier.csv"),
        write_trajectories_csv(runs, out / "trajectories.csv"),
        write_summary_table(
            runs, list(dict.fromkeys([reward, drift, perplexity, *task_scores, *table])), out / "summary.md"
        ),
        *plot_frontier(runs, reward, drift, out / "reward_vs_kl", xlabel=f"{drift} (drift)", ylabel=reward),
    ]
    if any(perplexity in run.final for run in runs if run.status == "done"):
        written += plot_frontier(
            runs, reward, perplexity, out / "reward_vs_perplexity", xlabel=f"{perplexity} (drift)", ylabel=reward
        )
    else:
        warnings.warn(f"no done run has {perplexity!r}; reward_vs_perplexity is not drawn", stacklevel=2)
    for column in task_scores:
        if any(column in run.final for run in runs if run.status == "done"):
            stem = out / f"reward_vs_{re.sub(r'[^A-Za-z0-9_.-]+', '_', column)}"
            written += plot_frontier(runs, reward, column, stem, xlabel=f"{column} (task score; reversed)",
                                     ylabel=reward, drift_is_a_score=True)  # fmt: skip
        else:
            warnings.warn(f"no done run has {column!r}; reward_vs_{column} is not drawn", stacklevel=2)
    written += plot_trajectories(runs, trajectory_reward or reward, trajectory_drift or drift, out / "trajectories")
    return {path.name: path for path in written}
