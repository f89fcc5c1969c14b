"""Completions tables for every logger (``lit_align.reporting``) and the reward/drift PNG (``RewardDriftPlot``),
checked by reading back what real loggers wrote."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from callbacks import RewardDriftPlot
from lit_align.reporting import jsonl_path, log_completions_table, markdown_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REWARD, DRIFT = "eval_objective/scores", "eval_drift/kl_to_init"


def cpu_trainer(logger, callbacks=(), **overrides) -> L.Trainer:
    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**settings, **overrides})


# ---- log_completions_table -------------------------------------------------------------------------------------


def test_csv_logger_gets_jsonl_rows_with_their_step(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    trainer = cpu_trainer(logger)
    first = [
        {"prompt": "Hi | there", "completion": "line one\nline two", "reward": 0.5},
        {"prompt": "Bye", "completion": "ok", "reward": torch.tensor(-1.25), "length": 2.0},
    ]
    second = [{"prompt": "Again", "completion": "é ✓", "reward": 2.0}]
    log_completions_table(trainer, "eval/completions", first, step=12)
    log_completions_table(trainer, "eval/completions", second, step=24)

    path = Path(logger.log_dir) / "eval_completions.jsonl"
    assert str(path) == jsonl_path(logger.log_dir, "eval/completions")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert records == [
        {"step": 12, "prompt": "Hi | there", "completion": "line one\nline two", "reward": 0.5},
        {"step": 12, "prompt": "Bye", "completion": "ok", "reward": -1.25, "length": 2.0},
        {"step": 24, "prompt": "Again", "completion": "é ✓", "reward": 2.0},
    ]
    # the metrics writer still works in the same directory afterwards (nothing deleted, no clash)
    logger.log_metrics({"loss": 1.0}, step=24)
    logger.save()
    assert (Path(logger.log_dir) / "metrics.csv").is_file()
    assert path.read_text(encoding="utf-8").count("\n") == 3


def test_rows_without_prompt_or_completion_are_refused(tmp_path):
    trainer = cpu_trainer(CSVLogger(tmp_path))
    with pytest.raises(ValueError, match="completion"):
        log_completions_table(trainer, "samples", [{"prompt": "x", "reward": 1.0}], step=0)


def test_markdown_table_escapes_pipes_and_line_breaks():
    rows = [{"prompt": "a|b", "completion": "x\ny", "reward": 0.123456, "kl": 1.0}, {"prompt": "c", "completion": "z"}]
    lines = markdown_table(rows).splitlines()
    assert lines[0] == "| prompt | completion | reward | kl |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| a\\|b | x<br>y | 0.1235 | 1 |"
    assert lines[3] == "| c | z |  |  |"
    assert len(lines) == 4  # one line per row: the newline inside a cell did not break the table


def test_tensorboard_logger_gets_a_text_table(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = cpu_trainer(logger)
    log_completions_table(trainer, "eval/completions", [{"prompt": "p", "completion": "c", "reward": 1.0}], step=3)
    logger.experiment.flush()
    events = list(Path(logger.log_dir).glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert not list(Path(logger.log_dir).glob("*.jsonl"))  # TensorBoard got the table, not the JSONL fallback

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logger.log_dir), size_guidance={"tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["tensors"]
    assert any(tag.startswith("eval/completions") for tag in tags), tags
    (tag,) = [tag for tag in tags if tag.startswith("eval/completions")]
    (event,) = accumulator.Tensors(tag)
    assert event.step == 3
    assert "| p | c | 1 |" in event.tensor_proto.string_val[0].decode()


# ---- RewardDriftPlot --------------------------------------------------------------------------------------------


def logged_run(tmp_path, columns=(REWARD, DRIFT)) -> CSVLogger:
    logger = CSVLogger(tmp_path, name="ppo_imdb")
    for step, (reward, drift) in zip((0, 12, 24), ((0.1, 0.0), (0.6, 1.5), (0.9, 4.0)), strict=True):
        values = {REWARD: reward, DRIFT: drift}
        logger.log_metrics({name: values[name] for name in columns}, step=step)
        logger.log_metrics({"train_loss": 1.0 / (step + 1)}, step=step)  # other rows leave the columns empty
    return logger  # not saved: the callback must flush it


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000  # three drawn panels, not an empty canvas


def test_reward_drift_plot_writes_a_png_next_to_the_metrics(tmp_path):
    logger = logged_run(tmp_path)
    trainer = cpu_trainer(logger)
    assert not (Path(logger.log_dir) / "metrics.csv").exists()
    RewardDriftPlot().on_fit_end(trainer, L.LightningModule())
    metrics = Path(logger.log_dir) / "metrics.csv"
    with metrics.open(newline="") as file:  # the logger was flushed before reading
        rows = [row for row in csv.DictReader(file) if row[REWARD]]
    assert [(row["step"], float(row[REWARD])) for row in rows] == [("0", 0.1), ("12", 0.6), ("24", 0.9)]
    assert_png(Path(logger.log_dir) / "reward_drift.png")


def test_reward_drift_plot_warns_about_a_missing_column_and_still_plots(tmp_path):
    logger = logged_run(tmp_path, columns=(REWARD,))
    trainer = cpu_trainer(logger)
    with pytest.warns(UserWarning, match="eval_drift/kl_to_init"):
        RewardDriftPlot(filename="trace.png").on_fit_end(trainer, L.LightningModule())
    assert_png(Path(logger.log_dir) / "trace.png")


def test_reward_drift_plot_without_a_csv_logger_warns_and_writes_nothing(tmp_path):
    trainer = cpu_trainer(False, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="no CSVLogger"):
        RewardDriftPlot().on_fit_end(trainer, L.LightningModule())
    assert not list(tmp_path.rglob("*.png"))


class Reporting(L.LightningModule):
    """A linear model whose validation logs the two columns and a completions table, as PPO's will."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("eval_objective/scores", float(self.global_step), on_epoch=True)
        self.log("eval_drift/kl_to_init", 0.1 * self.global_step, on_epoch=True)
        rows = [{"prompt": f"p{i}", "completion": f"c{i}", "reward": float(i)} for i in range(2)]
        log_completions_table(self.trainer, "eval/completions", rows, step=self.global_step)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_real_fit_writes_the_table_and_the_plot(tmp_path):
    data = torch.utils.data.TensorDataset(torch.randn(8, 2))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    logger = CSVLogger(tmp_path, name="fit")
    trainer = cpu_trainer(
        logger, [RewardDriftPlot()], max_steps=4, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0
    )
    trainer.fit(Reporting(), loader, loader)
    records = [json.loads(line) for line in (Path(logger.log_dir) / "eval_completions.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2, 2, 4, 4]
    assert records[1] == {"step": 2, "prompt": "p1", "completion": "c1", "reward": 1.0}
    assert_png(Path(logger.log_dir) / "reward_drift.png")
