"""``RewardDriftPlot``: at the end of fit, draw the run's reward and drift trace as a PNG next to ``metrics.csv``.

Three panels: reward vs step, drift vs step, and reward vs drift (the trade-off frontier that Elastic Reset and the
merging papers report: higher reward at lower drift is better). The numbers come from the ``CSVLogger``'s
``metrics.csv``, so the plot shows exactly what was logged; a run without a ``CSVLogger`` gets a warning and no plot,
and a column that was never logged gets a warning naming it and an empty panel. Works with any LightningModule.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_align.frontier import read_metric_columns


class RewardDriftPlot(L.Callback):
    """Write ``filename`` (a PNG: reward vs step, drift vs step, reward vs drift) into the CSV logger's log dir at
    the end of fit, on global rank 0.

    Args:
        reward: the reward column of ``metrics.csv`` (default: PPO's evaluation score ``eval_objective/scores``;
            GRPO logs ``eval_reward``).
        drift: the drift column (default: ``eval_drift/kl_to_init``, KL(π‖π_init) summed over the completion).
        filename: the PNG's name inside the log dir.
    """

    def __init__(
        self,
        reward: str = "eval_objective/scores",
        drift: str = "eval_drift/kl_to_init",
        filename: str = "reward_drift.png",
    ) -> None:
        super().__init__()
        self.reward = reward
        self.drift = drift
        self.filename = filename

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        logger = next((candidate for candidate in trainer.loggers if isinstance(candidate, CSVLogger)), None)
        if logger is None:
            rank_zero_warn(f"{type(self).__name__}: no CSVLogger among the trainer's loggers; no plot written")
            return
        logger.save()
        metrics_path = Path(logger.log_dir) / "metrics.csv"
        if not metrics_path.is_file():
            rank_zero_warn(f"{type(self).__name__}: {metrics_path} does not exist (nothing logged); no plot written")
            return
        series = read_metric_columns(metrics_path, (self.reward, self.drift))
        for name in (self.reward, self.drift):
            if not series.get(name):
                rank_zero_warn(
                    f"{type(self).__name__}: column {name!r} has no values in {metrics_path}; its panels are empty"
                )
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        path = self.plot(series, Path(logger.log_dir) / self.filename, title=f"{logger.name}/{version}")
        rank_zero_info(f"{type(self).__name__}: wrote {path}")

    def plot(self, series: dict[str, dict[int, float]], path: Path, title: str) -> Path:
        """Draw the three panels from ``{column: {step: value}}`` and save them to ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        reward = series.get(self.reward, {})
        drift = series.get(self.drift, {})
        figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for axis, name, values in ((axes[0], self.reward, reward), (axes[1], self.drift, drift)):
            steps = sorted(values)
            axis.plot(steps, [values[step] for step in steps], marker="o", markersize=3)
            axis.set_xlabel("step")
            axis.set_ylabel(name)
            axis.set_title(f"{name} vs step" if values else f"{name}: not logged")
            axis.grid(alpha=0.3)
        shared = sorted(set(reward) & set(drift))
        frontier = axes[2]
        if shared:
            points = frontier.scatter(
                [drift[step] for step in shared], [reward[step] for step in shared], c=shared, cmap="viridis"
            )
            frontier.plot([drift[step] for step in shared], [reward[step] for step in shared], alpha=0.3, color="grey")
            figure.colorbar(points, ax=frontier, label="step")
        frontier.set_xlabel(self.drift)
        frontier.set_ylabel(self.reward)
        frontier.set_title("reward vs drift" if shared else "reward vs drift: no step has both")
        frontier.grid(alpha=0.3)
        figure.suptitle(title)
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path
