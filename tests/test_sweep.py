"""``lit-align sweep``: grid parsing and its errors, and a real 2×2 sweep of tiny-llama RLOO runs that is killed
halfway, resumed without re-running what finished, and leaves the frontier report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_cli import print_config

from lit_align.sweep import DONE, Sweep, nested, prepare_run, run_sweep

TINY_RLOO = """
seed_everything: 0
trainer:
  max_steps: 2
  val_check_interval: 1
  limit_val_batches: 1
  num_sanity_val_steps: 1
  log_every_n_steps: 1
  enable_progress_bar: false
checkpoint: {{every_n_train_steps: 1}}
model:
  class_path: lit_align.PPOModule
  init_args:
    model: tiny-llama
    reward: {{class_path: lit_align.rewards.LexiconSentimentReward, init_args: {{text: completion}}}}
    advantage_estimator: rloo
    samples_per_prompt: 2
    sampling: {{max_new_tokens: 4}}
    ppo_epochs: 1
    drift_texts: 0
data:
  class_path: datamodules.HHDataModule
  init_args: {{data_path: {hh}, train_split: test, val_split: null, holdout: 8, limit_train: 8, max_length: 48,
    max_prompt_length: 32, batch_size: 2, eval_batch_size: 4}}
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_methods_grids_and_seeds_make_the_product_of_runs(tmp_path):
    base = write(tmp_path / "base.yaml", "seed_everything: 0\n")
    sweep = Sweep.from_dict(
        {
            "config": str(base),
            "set": {"trainer.max_steps": 4},
            "seeds": [0, 1, 2],
            "methods": {
                "kl": {"grid": {"model.init_args.kl_coef": [0.0, 0.1], "model.init_args.learning_rate": [1e-5, 3e-5]}},
                "reset": {
                    "set": {"model.init_args.kl_coef": 0.05},
                    "grid": {
                        "trainer.callbacks": [
                            [{"class_path": "callbacks.ElasticReset", "init_args": {"reset_every": 8}}]
                        ]
                    },
                },
            },
        }
    )
    assert len(sweep.runs) == (2 * 2 + 1) * 3
    assert [run.seed for run in sweep.runs] == [0] * 5 + [1] * 5 + [2] * 5  # seed-major: each seed's full comparison
    assert [run.method for run in sweep.runs[:5]] == ["kl"] * 4 + ["reset"]
    names = [run.name for run in sweep.runs]
    assert len(set(names)) == len(names)
    assert "kl_kl_coef=0.1_learning_rate=3e-05_seed=2" in names
    assert "reset_callbacks=ElasticReset-reset_every=8-_seed=0" in names
    reset = next(run for run in sweep.runs if run.method == "reset")
    assert reset.overrides() == {
        "trainer.max_steps": 4,
        "model.init_args.kl_coef": 0.05,
        "trainer.callbacks": [{"class_path": "callbacks.ElasticReset", "init_args": {"reset_every": 8}}],
    }
    assert nested({"a.b.c": 1, "a.b.d": 2, "e": 3}) == {"a": {"b": {"c": 1, "d": 2}}, "e": 3}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"config": "base.yaml", "grids": {}}, r"unknown keys \['grids'\]"),
        ({"config": "missing.yaml"}, r"config file\(s\) \['missing.yaml'\] do not exist"),
        ({"config": "base.yaml", "seeds": [0, "one"]}, "'seeds' must be a non-empty list of integers"),
        ({"config": "base.yaml", "grid": {"x": 1}}, "grid axis 'x' must be a non-empty list"),
        ({"config": "base.yaml", "grid": {}, "methods": {"a": {}}}, "either a top-level 'grid' or 'methods'"),
        ({"config": "base.yaml", "methods": {"a": {"grid": {}, "sett": {}}}}, "method 'a' may only have keys"),
        ({"config": "base.yaml", "grid": {"x": ["a b", "a-b"]}}, "share a directory name"),
    ],
)
def test_bad_sweep_files_name_the_problem(tmp_path, spec, message):
    write(tmp_path / "base.yaml", "seed_everything: 0\n")
    path = write(tmp_path / "sweep.yaml", yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=message):
        Sweep.from_yaml(path)


def statuses(out: Path) -> dict[str, str]:
    return {p.parent.name: json.loads(p.read_text())["status"] for p in (out / "runs").glob("*/run.json")}


# Imported by the fits from their working directory: holds a fit before its second step while the file ``hold``
# exists, so the test's Ctrl-C lands mid-run on any machine (a tiny-llama step is over before a poll sees it).
HOLD_CALLBACK = """
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class HoldBeforeSecondStep(Callback):
    def on_train_batch_start(self, trainer, *args):
        deadline = time.monotonic() + 120
        while trainer.global_step >= 1 and Path("hold").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
"""


def write_held_sweep(tmp_path: Path, hh_dir: Path, seeds: list[int]) -> Path:
    """A sweep of tiny-llama RLOO runs over two KL coefficients whose fits wait before step 2 while ``hold`` exists."""
    base = write(tmp_path / "base.yaml", TINY_RLOO.format(hh=hh_dir))
    write(tmp_path / "hold_callback.py", HOLD_CALLBACK)
    spec = {
        "name": "tiny",
        "config": str(base),
        "set": {"trainer.callbacks": [{"class_path": "hold_callback.HoldBeforeSecondStep"}]},
        "seeds": seeds,
        "grid": {"model.init_args.kl_coef": [0.0, 0.5]},
    }
    return write(tmp_path / "sweep.yaml", yaml.safe_dump(spec))


def test_a_killed_sweep_resumes_and_reports(tmp_path, hh_dir):
    sweep_file = write_held_sweep(tmp_path, hh_dir, seeds=[0, 1])
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "lit_align.cli", "sweep", str(sweep_file), "--out", str(out)]
    first = subprocess.Popen(command, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while DONE not in statuses(out).values() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the sweep and the fit it is running, as a cluster pre-emption would
    first.wait()
    killed = statuses(out)
    finished = [name for name, status in killed.items() if status == DONE]
    assert len(finished) == 1 and len(list((out / "runs").iterdir())) == 4, killed  # all prepared, one finished
    finished_log = (out / "runs" / finished[0] / "fit.log").read_text()

    # Ctrl-C (SIGINT to the process group, as a terminal sends it) once the next run has saved step 1: the sweep waits
    # for that fit to stop with a checkpoint instead of killing it, marks the run interrupted and exits 130.
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (tmp_path / "hold").touch()
    second = subprocess.Popen(command, env=env, cwd=tmp_path, start_new_session=True, **pipes)
    deadline = time.monotonic() + 300
    started = []
    while not started and second.poll() is None and time.monotonic() < deadline:
        started = [p for p in (out / "runs").glob("*/checkpoints/*step=1.ckpt") if p.parts[-3] != finished[0]]
        time.sleep(0.1)
    os.killpg(second.pid, signal.SIGINT)
    time.sleep(0.5)  # let the fit's handler take the signal before the held step goes on
    (tmp_path / "hold").unlink()
    stdout, stderr = second.communicate(timeout=300)
    again = f"rerun the same command to resume: lit-align sweep {sweep_file}"
    assert second.returncode == 130 and again in stderr, stdout[-2000:] + stderr[-3000:]
    interrupted = [name for name, status in statuses(out).items() if status == "interrupted"]
    assert len(interrupted) == 1, statuses(out)
    interrupted_log = (out / "runs" / interrupted[0] / "fit.log").read_text()
    assert "stopped by SIGINT" in interrupted_log and "Traceback" not in interrupted_log, interrupted_log[-3000:]
    assert (out / "runs" / interrupted[0] / "checkpoints" / "last.ckpt").is_file()

    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "4 runs, 1 done, 3 to run" in result.stdout
    assert set(statuses(out).values()) == {DONE}
    assert (out / "runs" / finished[0] / "fit.log").read_text() == finished_log  # not run again
    for run in (out / "runs").iterdir():
        assert (run / "policy" / "config.json").is_file() and (run / "overrides.yaml").is_file()
        record = json.loads((run / "run.json").read_text())
        assert record["method"] == "tiny" and set(record["knobs"]) == {"model.init_args.kl_coef"}
        saved = yaml.safe_load(next(run.rglob("config.yaml")).read_text())  # the fit's own config: knobs applied
        assert saved["model"]["init_args"]["kl_coef"] == record["knobs"]["model.init_args.kl_coef"]
        assert saved["seed_everything"] == record["seed"]
    report = out / "report"
    rows = (report / "frontier.csv").read_text().splitlines()
    assert len(rows) == 5 and "model.init_args.kl_coef" in rows[0]

    # Killed after its final checkpoint, before its export finished: the rerun exports that checkpoint (a fit resumed
    # at max_steps would make no step, export nothing and fail).
    cut = out / "runs" / finished[0]
    shutil.rmtree(cut / "policy")
    record = json.loads((cut / "run.json").read_text())
    (cut / "run.json").write_text(json.dumps({**record, "status": "running"}))
    log_before = (cut / "fit.log").read_text()
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "4 runs, 3 done, 1 to run" in result.stdout, result.stderr[-3000:]
    assert statuses(out)[finished[0]] == DONE and (cut / "policy" / "config.json").is_file()
    assert "no optimizer step" not in (cut / "fit.log").read_text()[len(log_before) :]
    for name in ("reward_vs_kl", "trajectories"):
        assert (report / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (report / f"{name}.svg").is_file()


def test_a_sweep_stopped_by_its_pid_stops_its_parallel_fits_with_checkpoints(tmp_path, hh_dir):
    """SIGTERM to the sweep's PID alone (``kill``, a scheduler), which its fits do not get: the sweep passes the stop
    on, each running fit saves ``last.ckpt`` after its step, both runs are marked interrupted, and it exits 130."""
    sweep_file = write_held_sweep(tmp_path, hh_dir, seeds=[0])
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "lit_align.cli", "sweep", str(sweep_file), "--out", str(out), "--parallel", "2"]
    (tmp_path / "hold").touch()
    sweep = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(list(out.glob("runs/*/checkpoints/*step=1.ckpt"))) < 2 and sweep.poll() is None:
        assert time.monotonic() < deadline, "the fits did not reach step 1"
        time.sleep(0.1)
    sweep.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    (tmp_path / "hold").unlink()
    stdout, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 130 and "rerun the same command to resume" in stderr, stdout[-2000:] + stderr[-3000:]
    assert set(statuses(out).values()) == {"interrupted"} and len(statuses(out)) == 2, statuses(out)
    for run in (out / "runs").iterdir():
        log = (run / "fit.log").read_text()
        assert "stopped by SIGTERM at step 2" in log and "Traceback" not in log, log[-3000:]
        assert (run / "checkpoints" / "last.ckpt").is_file()


def test_the_slurm_path_runs_a_job_array_through_submitit(tmp_path, hh_dir, monkeypatch):
    """submitit's local cluster runs the same job array SLURM would (``executor="slurm"``)."""
    pytest.importorskip("submitit")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = write(tmp_path / "base.yaml", TINY_RLOO.format(hh=hh_dir))
    spec = {"name": "array", "config": str(base), "seeds": [0], "grid": {"model.init_args.kl_coef": [0.0, 0.5]}}
    result = run_sweep(
        Sweep.from_dict(spec), tmp_path / "out", executor="slurm", slurm={"cluster": "local"}, report=False
    )
    assert set(result.values()) == {DONE} and len(result) == 2
    assert list((tmp_path / "out" / "slurm").glob("*_log.out"))  # submitit's own job logs


REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "configs" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_every_shipped_experiment_file_parses(path, monkeypatch, tmp_path):
    """Sweep files expand into their runs (paths relative to the repository, where the README runs them) and every
    run's overrides parse as a fit config; ``*_evaluate.yaml`` files parse as ``lit-align evaluate`` options."""
    from lit_align.evaluate import evaluate_parser

    monkeypatch.chdir(REPO)
    if path.stem.endswith("_evaluate"):
        config = evaluate_parser().parse_args(["--config", str(path), "--policies", "tiny-llama"])
        assert config.prompts >= 128  # issue 17: at least 128 held-out prompts per point
        return
    sweep = Sweep.from_yaml(path)
    if sweep.report:  # an experiment (not a preparatory sweep such as hh_sft): 3 seeds, every run evaluated
        assert len({run.seed for run in sweep.runs}) >= 3 and all(run.evaluate for run in sweep.runs)
    for evaluate in {run.evaluate for run in sweep.runs if run.evaluate}:
        stacked = [arg for config in evaluate for arg in ("--config", str(config))]
        evaluate_parser().parse_args([*stacked, "--policies", "tiny-llama"])
    first_of_each_knob = {(run.method, json.dumps(run.knobs, sort_keys=True)): run for run in sweep.runs}
    for run in first_of_each_knob.values():  # the fit parser must know every override (a typo would fail every run)
        directory = prepare_run(sweep, tmp_path, run)
        args = [arg for config in run.configs for arg in ("--config", str(config))]
        parsed = print_config(*args, "--config", str(directory / "overrides.yaml"), cwd=tmp_path)
        assert parsed["seed_everything"] == run.seed
        assert parsed["model"]["init_args"]["export_dir"] == str(directory / "policy")


def test_a_typo_in_an_override_fails_before_any_run_trains(tmp_path, hh_dir):
    base = write(tmp_path / "base.yaml", TINY_RLOO.format(hh=hh_dir))
    spec = {"config": str(base), "seeds": [0, 1], "grid": {"model.init_args.kl_cof": [0.1, 0.2]}}
    with pytest.raises(ValueError, match=r"does not parse .*kl_cof"):
        run_sweep(Sweep.from_dict(spec), tmp_path / "out", report=False)
    assert not list((tmp_path / "out" / "runs").glob("*/run.json"))  # nothing started


def test_a_method_may_bring_its_own_base_config(tmp_path):
    base, other = write(tmp_path / "base.yaml", "seed_everything: 0\n"), write(tmp_path / "other.yaml", "{}\n")
    methods = {"dm": {"grid": {"model.init_args.baseline": [True, False]}}, "rl": {"config": [str(other)]}}
    sweep = Sweep.from_dict({"config": str(base), "methods": methods})
    assert {run.method: run.configs for run in sweep.runs} == {"dm": (base,), "rl": (other,)}
    with pytest.raises(ValueError, match=r"method 'rl'.*do not exist"):
        Sweep.from_dict({"config": str(base), "methods": {"rl": {"config": "missing.yaml"}}})


def test_a_method_may_bring_its_own_evaluate_configs(tmp_path):
    base = write(tmp_path / "base.yaml", "seed_everything: 0\n")
    shared, own = write(tmp_path / "eval.yaml", "prompts: 128\n"), write(tmp_path / "ref.yaml", "reference: x\n")
    methods = {"plain": {}, "soup": {"evaluate": [str(shared), str(own)]}}
    sweep = Sweep.from_dict({"config": str(base), "evaluate": str(shared), "methods": methods})
    assert {run.method: run.evaluate for run in sweep.runs} == {"plain": (shared,), "soup": (shared, own)}
    with pytest.raises(ValueError, match=r"method 'soup' 'evaluate'.*do not exist"):
        Sweep.from_dict({"config": str(base), "methods": {"soup": {"evaluate": "missing.yaml"}}})


def test_seed_keys_give_each_run_its_seed_in_every_named_place(tmp_path):
    base = write(tmp_path / "base.yaml", "seed_everything: 0\n")
    spec = {"config": str(base), "seeds": [3, 4], "seed_keys": ["seed_everything", "data.init_args.shuffle_seed"]}
    sweep = Sweep.from_dict(spec)
    for run in sweep.runs:
        overrides = yaml.safe_load((prepare_run(sweep, tmp_path, run) / "overrides.yaml").read_text())
        assert overrides["seed_everything"] == overrides["data"]["init_args"]["shuffle_seed"] == run.seed
    with pytest.raises(ValueError, match="seed_keys"):
        Sweep.from_dict({**spec, "seed_keys": "seed_everything"})


def test_a_required_sweep_runs_first_and_its_failure_stops_the_sweep(tmp_path, hh_dir):
    """``requires``: the SFT sweep a soup experiment needs runs (or is skipped when done) before the sweep's own runs;
    if one of its runs fails, nothing of the sweep itself starts."""
    broken = write(tmp_path / "broken.yaml", TINY_RLOO.format(hh=hh_dir).replace("model: tiny-llama", "model: nowhere"))
    required = write(tmp_path / "sft.yaml", yaml.safe_dump({"config": str(broken), "seeds": [1]}))
    base = write(tmp_path / "base.yaml", TINY_RLOO.format(hh=hh_dir))
    spec = {"config": str(base), "requires": [{"sweep": str(required), "out": str(tmp_path / "sft")}]}
    with pytest.raises(RuntimeError, match=r"required sweep .*sft.yaml has runs not done: \['sft_seed=1'\]"):
        run_sweep(Sweep.from_dict(spec), tmp_path / "out", report=False)
    assert (tmp_path / "sft" / "runs" / "sft_seed=1" / "fit.log").is_file()
    assert not list((tmp_path / "out" / "runs").glob("*/run.json"))  # the sweep's own run never started
    for bad in ([{"sweep": str(required)}], [{"sweep": "missing.yaml", "out": "x"}]):
        with pytest.raises(ValueError, match="requires|does not exist"):
            Sweep.from_dict({**spec, "requires": bad})


def test_a_run_interrupted_while_evaluating_is_not_trained_again(tmp_path):
    """The fit ended (its policy exported) and the sweep stopped during ``lit-align evaluate``: a rerun must not start
    the fit again (resumed at max_steps it would make no step and fail) but only evaluate."""
    from lit_align.sweep import EVALUATING, RunSpec, execute_run, read_status, write_run_json

    run, directory = RunSpec("m", {"x": 1}, 0), tmp_path / "run"
    directory.mkdir()
    write_run_json(directory, run, EVALUATING)
    failing_fit = [sys.executable, "-c", "raise SystemExit(1)"]
    assert execute_run(failing_fit, directory, run) == 0 and read_status(directory) == DONE
    write_run_json(directory, run, "running")  # interrupted during the fit: the fit runs again
    assert execute_run(failing_fit, directory, run) == 1 and read_status(directory) == "failed"


CTRL_C_DURING_A_RUN = """
import json, os, signal, sys
from pathlib import Path
from lit_align.sweep import RunSpec, SweepInterrupted, execute_run, read_status

directory, exit_code, evaluate = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
directory.mkdir()
signal.signal(signal.SIGINT, signal.default_int_handler)  # as lit-align sweep does: pytest may run as a background job
# The child sends the sweep its Ctrl-C, notes the SIGTERM the sweep passes on (as FitGuard would, already stopping),
# then ends with exit_code: 0 as a fit that reached max_steps anyway, 130 as one FitGuard stopped with a checkpoint.
child = (
    "import os, signal, time; from pathlib import Path\\n"
    "signal.signal(signal.SIGTERM, lambda *_: Path('got_sigterm').touch())\\n"
    "os.kill(os.getppid(), signal.SIGINT); time.sleep(1); raise SystemExit(%d)"
)
try:
    execute_run([sys.executable, "-c", child % exit_code], directory, RunSpec("m", {}, 0), evaluate=evaluate)
except SweepInterrupted as interrupted:
    print(json.dumps({"raised": interrupted.code, "status": read_status(directory)}))
"""


@pytest.mark.parametrize(
    "exit_code, evaluate, status",
    [(130, [], "interrupted"), (0, [], DONE), (0, ["evaluate.yaml"], "evaluating")],
)
def test_a_ctrl_c_is_recorded_by_how_the_fit_ended(tmp_path, exit_code, evaluate, status):
    """The Ctrl-C stops the sweep either way; a fit that stopped early resumes, while one that finished despite it
    (the signal came during its last step) is done, or only evaluates on the rerun."""
    script = write(tmp_path / "ctrl_c.py", CTRL_C_DURING_A_RUN)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run"), str(exit_code), *evaluate],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert "interrupted: waiting for the run" in result.stdout, result.stderr[-2000:]
    assert (tmp_path / "got_sigterm").is_file()  # the sweep passed the stop on to its child
    assert json.loads(result.stdout.splitlines()[-1]) == {"raised": exit_code, "status": status}


def test_a_fit_stopped_by_a_signal_it_alone_got_is_interrupted_not_failed(tmp_path):
    """A fit that a scheduler's SIGTERM (or a Ctrl-C) reached without the sweep exits 128 + the signal after saving
    ``last.ckpt``: the run resumes from it, so it is ``interrupted``; any other non-zero exit is ``failed``."""
    from lit_align.sweep import RunSpec, execute_run, read_status

    for code, status in ((143, "interrupted"), (130, "interrupted"), (1, "failed"), (0, DONE)):
        directory = tmp_path / str(code)
        directory.mkdir()
        fit = [sys.executable, "-c", f"raise SystemExit({code})"]
        assert execute_run(fit, directory, RunSpec("m", {}, 0)) == code and read_status(directory) == status, code


def test_keep_checkpoints_false_deletes_a_done_runs_checkpoints_only(tmp_path):
    """``keep_checkpoints: false``: once a run is done its ``checkpoints/`` goes (the report reads logs, evaluation
    and policy); a failed run keeps them to resume from."""
    from lit_align.sweep import RunSpec, execute_run

    succeeding, failing = [sys.executable, "-c", "pass"], [sys.executable, "-c", "raise SystemExit(1)"]
    for name, command, keep, kept in [
        ("done_deleted", succeeding, False, False),
        ("failed_kept", failing, False, True),
        ("done_kept", succeeding, True, True),
    ]:
        directory = tmp_path / name
        (directory / "checkpoints").mkdir(parents=True)
        (directory / "checkpoints" / "last.ckpt").write_bytes(b"weights")
        (directory / "policy").mkdir()
        execute_run(command, directory, RunSpec(name, {}, 0), keep_checkpoints=keep)
        assert (directory / "checkpoints" / "last.ckpt").exists() == kept, name
        assert (directory / "policy").is_dir()
    config = {"config": str(write(tmp_path / "base.yaml", "seed_everything: 0\n"))}
    assert Sweep.from_dict({**config, "keep_checkpoints": False}).keep_checkpoints is False
    assert Sweep.from_dict(config).keep_checkpoints is True
    with pytest.raises(ValueError, match="'keep_checkpoints' must be true or false, got 'no'"):
        Sweep.from_dict({**config, "keep_checkpoints": "no"})
