"""``lit-align sweep``: every combination of a grid of config overrides, each run an ordinary ``lit-align fit``.

Methods are compared by the trade-off between reward and drift, not by one final reward (Noukhovitch et al. 2023,
*Language Model Alignment with Elastic Reset*, §4), so a comparison is a sweep: a method's knob (the KL coefficient,
an interpolation weight, a reset interval) over several values and seeds, and a frontier drawn from all the runs
(:mod:`lit_align.frontier`). A sweep file::

    name: imdb_kl_sweep
    config: [configs/imdb/ppo.yaml]          # the base config(s), stacked like --config ... --config ...
                                              # (a method may name its own: a different module class)
    set: {trainer.max_steps: 24}             # overrides for every run (dotted keys, as on the command line)
    seeds: [0, 1, 2]
    seed_keys: [seed_everything, data.init_args.shuffle_seed]   # what each seed sets (default: seed_everything)
    requires: [{sweep: configs/experiments/hh_sft.yaml, out: outputs/experiments/hh_sft}]  # run (or skip) first
    keep_checkpoints: false                   # delete a run's checkpoints/ once it is done (default: keep)
    methods:                                  # one block per method; a method's runs = the product of its grid
      kl_penalty:
        grid: {model.init_args.kl_coef: [0.0, 0.01, 0.05, 0.1, 0.3]}
      elastic_reset:
        set: {model.init_args.kl_coef: 0.05}
        grid:
          trainer.callbacks:                  # an axis whose values are lists of callback blocks
            - [{class_path: callbacks.ElasticReset, init_args: {reset_every: 8}}]
            - [{class_path: callbacks.ElasticReset, init_args: {reset_every: 16}}]

Without ``methods`` the top-level ``grid`` is one method named after the sweep. Runs go in seed-major order (every
method and knob for the first seed, then the next seed), so a sweep stopped early is a complete comparison at fewer
seeds. ``evaluate: <config>`` (or a list of configs, stacked; a method may bring its own) scores each
finished run's exported policy with ``lit-align evaluate`` (:mod:`lit_align.evaluate`: held-out prompts, reward, KL
to the reference, perplexity, with intervals) into the run's ``evaluation.json``; ``report:`` names the columns the
frontier report draws (``reward``, ``drift``, ``perplexity``, ``trajectory_reward``, ``trajectory_drift``) and
``table``, more columns for its ``summary.md``, and ``task_scores``, columns drawn as reward vs task score.

Every run gets its own directory ``<out>/runs/<run name>/`` holding ``overrides.yaml`` (the run's settings as a
config file), ``run.json`` (method, knobs, seed, status, wall time), the fit's own ``config.yaml``,
``logs/version_*/metrics.csv``, ``checkpoints/`` (deleted once the run is done with ``keep_checkpoints: false``:
a 135M-parameter run keeps 1.6 GB) and the exported ``policy/``. A run whose ``run.json`` says ``done`` is skipped,
so a sweep killed halfway resumes where it stopped; a run that was interrupted resumes from its ``last.ckpt``
(``--ckpt_path``). Runs go one at a time or ``parallel`` at a time as local processes, or to SLURM as a
job array through submitit (the optional extra ``lit-align[slurm]``): a cluster engine, not a home-made scheduler.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SWEEP_KEYS = {
    "name", "config", "set", "grid", "seeds", "seed_keys", "methods", "evaluate", "report", "requires",
    "keep_checkpoints",
}  # fmt: skip
METHOD_KEYS = {"config", "set", "grid", "evaluate"}
DONE, RUNNING, EVALUATING, FAILED, INTERRUPTED = "done", "running", "evaluating", "failed", "interrupted"
STOPPED_BY_SIGNAL = {128 + signal.SIGINT, 128 + signal.SIGTERM}  # a fit's exit after a stop with a checkpoint


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its method, its knobs (the grid values it takes, by dotted key) and its seed."""

    method: str
    knobs: dict[str, Any]
    seed: int
    fixed: dict[str, Any] = field(default_factory=dict)  # the sweep's and the method's ``set``
    configs: tuple[Path, ...] = ()  # the base configs (the method's ``config``, else the sweep's)
    evaluate: tuple[Path, ...] = ()  # ``lit-align evaluate`` configs (the method's ``evaluate``, else the sweep's)

    @property
    def name(self) -> str:
        """A readable, unique, filesystem-safe directory name: method, each knob's last key part and value, seed."""
        parts = [self.method]
        for key, value in self.knobs.items():
            parts.append(f"{key.split('.')[-1]}={short_value(value)}")
        parts.append(f"seed={self.seed}")
        return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", "_".join(parts))

    def overrides(self) -> dict[str, Any]:
        """The run's dotted-key settings: the fixed ones, then the knobs (knobs win)."""
        return {**self.fixed, **self.knobs}


def short_value(value: Any) -> str:
    """A knob value for a directory name: numbers and strings as written; callback blocks by their class names."""
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        names = [str(item.get("class_path", "?")).rsplit(".", 1)[-1] for item in value]
        arguments = [",".join(f"{k}={v}" for k, v in (item.get("init_args") or {}).items()) for item in value]
        return "+".join(f"{n}({a})" if a else n for n, a in zip(names, arguments, strict=True)) or "none"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


@dataclass
class Sweep:
    """A parsed sweep file (see the module docstring): base configs, methods and seeds."""

    name: str
    configs: list[Path]
    runs: list[RunSpec]
    source: Path | None = None
    evaluate: tuple[Path, ...] = ()  # the sweep's ``lit-align evaluate`` config(s); a method may bring its own
    report: dict[str, Any] = field(default_factory=dict)  # frontier_report's column names (reward, drift, ..., table)
    seed_keys: tuple[str, ...] = ("seed_everything",)  # the dotted keys that take each run's seed
    requires: tuple[tuple[Path, Path], ...] = ()  # (sweep file, its out dir): sweeps that must be done first
    keep_checkpoints: bool = True  # False: a run's checkpoints/ is deleted once it is done (its policy/ stays)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> Sweep:
        """Read and check a sweep file; config paths are relative to the current directory, as on the command line."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sweep file {path} does not exist")
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        return cls.from_dict(spec, source=path)

    @classmethod
    def from_dict(cls, spec: Any, source: Path | None = None) -> Sweep:
        where = f"sweep file {source}" if source is not None else "sweep"
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: expected a mapping with keys {sorted(SWEEP_KEYS)}, got {type(spec).__name__}")
        if unknown := sorted(set(spec) - SWEEP_KEYS):
            raise ValueError(f"{where}: unknown keys {unknown}; valid: {sorted(SWEEP_KEYS)}")
        name = str(spec.get("name") or (source.stem if source is not None else "sweep"))
        configs = config_files(spec.get("config"), where)
        seeds = spec.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise ValueError(f"{where}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
        shared = mapping(spec.get("set"), f"{where}: 'set'")
        methods = spec.get("methods")
        if methods is None:
            methods = {name: {"grid": spec.get("grid") or {}}}
        elif "grid" in spec:
            raise ValueError(f"{where}: give either a top-level 'grid' or 'methods' (each with its own grid)")
        if not isinstance(methods, dict) or not methods:
            raise ValueError(f"{where}: 'methods' must map method names to {{set, grid}} blocks")
        evaluate = config_files(spec["evaluate"], f"{where}: 'evaluate'") if spec.get("evaluate") else []
        runs = []
        for method, block in methods.items():  # runs in seed-major order: each seed's whole comparison, then the next
            block = block or {}
            if not isinstance(block, dict) or (unknown := sorted(set(block) - METHOD_KEYS)):
                raise ValueError(f"{where}: method {method!r} may only have keys {sorted(METHOD_KEYS)}")
            fixed = {**shared, **mapping(block.get("set"), f"{where}: method {method!r} 'set'")}
            method_configs = (
                config_files(block["config"], f"{where}: method {method!r}") if "config" in block else configs
            )
            method_evaluate = (
                config_files(block["evaluate"], f"{where}: method {method!r} 'evaluate'")
                if "evaluate" in block
                else evaluate
            )
            grid = mapping(block.get("grid"), f"{where}: method {method!r} 'grid'")
            for key, values in grid.items():
                if not isinstance(values, list) or not values:
                    raise ValueError(f"{where}: method {method!r} grid axis {key!r} must be a non-empty list")
            keys = list(grid)
            for combination in itertools.product(*(grid[k] for k in keys)):
                for seed in seeds:
                    knobs = dict(zip(keys, combination, strict=True))
                    runs.append(RunSpec(str(method), knobs, seed, fixed, tuple(method_configs), tuple(method_evaluate)))
        runs.sort(key=lambda run: seeds.index(run.seed))  # stable: methods and grids keep their order per seed
        names = [run.name for run in runs]
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: two runs would share a directory name; make the grid values distinct")
        seed_keys = spec.get("seed_keys", ["seed_everything"])
        if not isinstance(seed_keys, list) or not seed_keys or not all(isinstance(k, str) for k in seed_keys):
            raise ValueError(f"{where}: 'seed_keys' must be a non-empty list of dotted keys, got {seed_keys!r}")
        report = mapping(spec.get("report"), f"{where}: 'report'")
        allowed = {"reward", "drift", "perplexity", "trajectory_reward", "trajectory_drift", "table", "task_scores"}
        if unknown := sorted(set(report) - allowed):
            raise ValueError(f"{where}: 'report' has unknown keys {unknown}; valid: {sorted(allowed)}")
        lists = {key: report.pop(key) for key in ("table", "task_scores") if key in report}
        for key, columns in lists.items():
            if not isinstance(columns, list) or not all(isinstance(column, str) for column in columns):
                raise ValueError(f"{where}: 'report: {key}' must be a list of column names, got {columns!r}")
        report = {**{k: str(v) for k, v in report.items()}, **lists}
        requires = []
        for item in spec.get("requires") or []:
            if not isinstance(item, dict) or set(item) != {"sweep", "out"}:
                raise ValueError(f"{where}: each 'requires' entry must be {{sweep: FILE, out: DIR}}, got {item!r}")
            if not Path(item["sweep"]).is_file():
                raise ValueError(f"{where}: required sweep file {item['sweep']} does not exist")
            requires.append((Path(item["sweep"]), Path(item["out"])))
        keep_checkpoints = spec.get("keep_checkpoints", True)
        if not isinstance(keep_checkpoints, bool):
            raise ValueError(f"{where}: 'keep_checkpoints' must be true or false, got {keep_checkpoints!r}")
        return cls(
            name, configs, runs, source, tuple(evaluate), report, tuple(seed_keys), tuple(requires), keep_checkpoints
        )


def config_files(value: Any, where: str) -> list[Path]:
    """One or more existing config files (a string or a list), relative to the current directory."""
    configs = [value] if isinstance(value, str) else value
    if not isinstance(configs, list) or not configs:
        raise ValueError(f"{where}: must name one or more config files (a path or a list of paths)")
    missing = [c for c in configs if not Path(c).is_file()]
    if missing:
        raise ValueError(f"{where}: config file(s) {missing} do not exist (paths are relative to {Path.cwd()})")
    return [Path(c) for c in configs]


def mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping of dotted keys to values, got {type(value).__name__}")
    return dict(value)


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"model.init_args.kl_coef": 0.1}`` → ``{"model": {"init_args": {"kl_coef": 0.1}}}`` (a config file's form,
    which jsonargparse merges onto the base configs key by key)."""
    tree: dict[str, Any] = {}
    for key, value in dotted.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r} conflicts with another override of {part!r}")
        node[leaf] = value
    return tree


# ---- one run ----------------------------------------------------------------------------------------------------


def run_directory(out: Path, run: RunSpec) -> Path:
    return out / "runs" / run.name


def read_status(directory: Path) -> str | None:
    path = directory / "run.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("status")
    except json.JSONDecodeError:
        return None


def write_run_json(directory: Path, run: RunSpec, status: str, **extra: Any) -> None:
    record = {"name": run.name, "method": run.method, "knobs": run.knobs, "seed": run.seed, "status": status, **extra}
    temporary = directory / "run.json.tmp"
    temporary.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    temporary.replace(directory / "run.json")  # atomic: a killed sweep never leaves half a file


def fit_command(configs: Sequence[Path], directory: Path, resume: bool = True) -> list[str]:
    """The ``lit-align fit`` command line of a run whose settings are in ``directory/overrides.yaml``; an interrupted
    run resumes from its ``last.ckpt`` (unless ``resume`` is False). A run killed after its final checkpoint but
    before its export finished gets ``lit-align export`` of that checkpoint instead: resumed at ``max_steps``, a fit
    makes no step and exports nothing (:class:`lit_align.checkpointing.FitGuard`)."""
    last = directory / "checkpoints" / "last.ckpt"
    if resume and last.exists() and training_is_complete(last, directory):
        return [sys.executable, "-m", "lit_align.cli", "export", "--ckpt_path", str(last), "--export_dir",
                str(directory / "policy")]  # fmt: skip
    command = [sys.executable, "-m", "lit_align.cli", "fit"]
    for config in configs:
        command += ["--config", str(Path(config).resolve())]
    command += ["--config", str(directory / "overrides.yaml")]
    if resume and last.exists():
        command += ["--ckpt_path", str(last)]
    return command


def training_is_complete(checkpoint: Path, directory: Path) -> bool:
    """Whether ``checkpoint`` is at the ``trainer.max_steps`` of the run's own saved ``config.yaml`` (the newest
    ``logs/version_*``); False when either is unknown or the checkpoint is unreadable (the run resumes and the fit
    decides, or names the bad file)."""
    from lit_align.cli import CheckpointPathError, read_checkpoint

    configs = sorted(directory.glob("logs/version_*/config.yaml"), key=lambda path: path.stat().st_mtime)
    if not configs:
        return False
    trainer = (yaml.safe_load(configs[-1].read_text(encoding="utf-8")) or {}).get("trainer") or {}
    max_steps = trainer.get("max_steps")
    if not isinstance(max_steps, int) or max_steps <= 0:
        return False
    try:
        step = read_checkpoint(checkpoint).get("global_step")
    except CheckpointPathError:
        return False
    return isinstance(step, int) and step >= max_steps


def prepare_run(sweep: Sweep, out: Path, run: RunSpec) -> Path:
    """Create the run's directory and its ``overrides.yaml``: the knobs, the seed, and where logs, checkpoints and
    the exported policy go (inside the directory)."""
    directory = run_directory(out, run)
    directory.mkdir(parents=True, exist_ok=True)
    placement = {
        **dict.fromkeys(sweep.seed_keys, run.seed),
        "trainer.default_root_dir": str(directory),
        "trainer.logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(directory), "name": "logs"},
        },
        "checkpoint.dirpath": str(directory / "checkpoints"),
        "model.init_args.export_dir": str(directory / "policy"),
    }
    overrides = nested({**placement, **run.overrides()})
    (directory / "overrides.yaml").write_text(yaml.safe_dump(overrides, sort_keys=False), encoding="utf-8")
    return directory


def execute_run(
    command: list[str], directory: Path, run: RunSpec, evaluate: Sequence[Path] = (), keep_checkpoints: bool = True
) -> int:
    """Run one fit to completion (stdout and stderr to ``directory/fit.log``), then, with ``evaluate`` configs,
    ``lit-align evaluate`` of its exported policy into ``directory/evaluation.json``; records the status in
    run.json (``done`` only when both succeeded). Without ``keep_checkpoints`` a done run's ``checkpoints/`` is
    deleted: the report needs only its logs, ``evaluation.json`` and ``policy/``."""
    if STOPPING.is_set():  # a --parallel worker took this run just as the sweep was interrupted
        raise SweepInterrupted(130)
    started = time.perf_counter()
    trained = read_status(directory) == EVALUATING  # the fit ended before an interruption: only evaluate again
    write_run_json(directory, run, EVALUATING if trained else RUNNING)
    interrupted: SweepInterrupted | None = None
    with open(directory / "fit.log", "a", encoding="utf-8") as log:
        try:
            code = 0 if trained else run_to_the_end(command, log)
            if code == 0 and evaluate:
                write_run_json(directory, run, EVALUATING)
                code = evaluate_run(directory, evaluate, log)
        except SweepInterrupted as interrupt:
            interrupted, code = interrupt, interrupt.code
    stage = read_status(directory)
    if code == 0:  # after a Ctrl-C that came in its last step, a fit that finished still needs its evaluation
        status = EVALUATING if interrupted is not None and stage == RUNNING and evaluate else DONE
    elif interrupted is not None or code in STOPPED_BY_SIGNAL:  # also a signal the fit alone got (a scheduler's)
        status = INTERRUPTED if stage == RUNNING else stage  # stopped in training: resumes; in evaluation: evaluates
    else:
        status = FAILED
    write_run_json(directory, run, status, wall_s=round(time.perf_counter() - started, 1), exit_code=code)
    if status == DONE and not keep_checkpoints:
        shutil.rmtree(directory / "checkpoints", ignore_errors=True)
    if interrupted is not None:
        raise interrupted
    return code


def run_to_the_end(command: list[str], log) -> int:
    """Run ``command`` (output to ``log``) and return its exit code, also through a Ctrl-C.

    A Ctrl-C (or a SIGTERM of the sweep) stops the running children through :func:`stop_running_children`: the fit
    stops after its current step with a checkpoint (``FitGuard``), which ``subprocess.call`` would cut short by
    killing it a quarter-second later. So the first interrupt waits for the child to end on its own and is raised
    again after it, as is the end of a child stopped by another thread's interrupt (``--parallel``); a second
    interrupt kills it."""
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=Path.cwd())
    RUNNING_CHILDREN.add(process)
    interrupts = 0
    try:
        while True:
            try:
                code = process.wait()
                break
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts == 1:
                    print(
                        "  interrupted: waiting for the run to save its checkpoint (Ctrl-C again to kill it)",
                        flush=True,
                    )
                stop_running_children(kill=interrupts > 1)
    finally:
        RUNNING_CHILDREN.discard(process)
    if interrupts or STOPPING.is_set():
        raise SweepInterrupted(code)
    return code


RUNNING_CHILDREN: set[subprocess.Popen] = set()  # the fits and evaluations this sweep runs now
STOPPING = threading.Event()  # set by the first interrupt: every run ends as interrupted, and no new run starts


def stop_running_children(kill: bool = False) -> None:
    """Send each running child SIGTERM (a fit stops after its step with a checkpoint, as on the terminal's Ctrl-C,
    which a sweep signalled alone, by its PID or a scheduler, would not pass on), or SIGKILL with ``kill``."""
    STOPPING.set()
    for process in list(RUNNING_CHILDREN):
        if process.poll() is None:
            process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)


class SweepInterrupted(KeyboardInterrupt):
    """A Ctrl-C during a run, raised after that run's process ended (``code``: its exit status)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def evaluate_run(directory: Path, evaluate: Sequence[Path], log) -> int:
    """``lit-align evaluate --config EVALUATE [--config ...] --policies <run>/policy`` (later configs override
    earlier ones key by key); the policy's row (its numbers) becomes ``evaluation.json``, which the frontier report
    reads next to the training metrics."""
    rows_stem = directory / "evaluation_rows"
    command = [sys.executable, "-m", "lit_align.cli", "evaluate"]
    for config in evaluate:
        command += ["--config", str(Path(config).resolve())]
    command += ["--policies", str(directory / "policy"), "--out", str(rows_stem)]
    code = run_to_the_end(command, log)
    if code != 0:
        return code
    policy_row = json.loads(rows_stem.with_suffix(".json").read_text(encoding="utf-8"))[-1]
    numbers = {
        k: v for k, v in policy_row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seed"
    }
    (directory / "evaluation.json").write_text(json.dumps(numbers, indent=1) + "\n", encoding="utf-8")
    return 0


# ---- the sweep ----------------------------------------------------------------------------------------------------


def run_sweep(
    sweep: Sweep | str | os.PathLike[str],
    out: str | os.PathLike[str],
    parallel: int = 1,
    executor: str = "local",
    slurm: dict[str, Any] | None = None,
    report: bool = True,
) -> dict[str, str]:
    """Run every run of ``sweep`` not yet ``done`` into ``out``; returns ``{run name: status}``. ``parallel`` local
    processes at a time (``executor="local"``), or one SLURM job array (``executor="slurm"``, ``slurm``: submitit's
    ``slurm_*`` parameters, e.g. ``{"slurm_partition": "gpu", "timeout_min": 120}``), then the frontier report
    (:func:`lit_align.frontier.frontier_report`) of everything finished."""
    sweep = sweep if isinstance(sweep, Sweep) else Sweep.from_yaml(sweep)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if sweep.source is not None:
        (out / "sweep.yaml").write_text(sweep.source.read_text(encoding="utf-8"), encoding="utf-8")
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    pending = [run for run in sweep.runs if read_status(run_directory(out, run)) != DONE]
    print(
        f"lit-align sweep {sweep.name}: {len(sweep.runs)} runs, {len(sweep.runs) - len(pending)} done, "
        f"{len(pending)} to run",
        flush=True,
    )
    jobs = [
        (
            fit_command(run.configs, prepare_run(sweep, out, run)),
            run_directory(out, run),
            run,
            run.evaluate,
            sweep.keep_checkpoints,
        )
        for run in pending
    ]
    check_configs(jobs)
    for required, required_out in sweep.requires:  # e.g. the SFT models a soup experiment starts from
        statuses = run_sweep(required, required_out, parallel, executor, slurm, report=False)
        if not_done := sorted(name for name, status in statuses.items() if status != DONE):
            raise RuntimeError(f"sweep {sweep.name}: required sweep {required} has runs not done: {not_done}")
    if executor == "local":
        run_locally(jobs, parallel)
    elif executor == "slurm":
        run_on_slurm(jobs, out, slurm or {})
    else:
        raise ValueError(f"executor={executor!r}: choose 'local' or 'slurm'")
    statuses = {run.name: read_status(run_directory(out, run)) or "pending" for run in sweep.runs}
    if report and any(status == DONE for status in statuses.values()):
        from lit_align.frontier import frontier_report

        frontier_report(out, **sweep.report)
    return statuses


def check_configs(jobs: list[tuple]) -> None:
    """Parse one run of every method and knob key set with ``lit-align fit --print_config`` before anything trains:
    a typo in an override fails here, with the parser's message, instead of in every run."""
    seen = set()
    for _, directory, run, *_ in jobs:
        signature = (run.method, tuple(run.knobs))
        if signature in seen:
            continue
        seen.add(signature)
        command = [*fit_command(run.configs, directory, resume=False), "--print_config"]
        result = subprocess.run(command, capture_output=True, text=True, cwd=Path.cwd())
        if result.returncode != 0:
            message = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise ValueError(f"sweep: run {run.name} does not parse ({directory / 'overrides.yaml'}): {message}")


def run_locally(jobs: list[tuple], parallel: int) -> None:
    """Up to ``parallel`` fits at a time as child processes; each child's own threads share the machine."""
    STOPPING.clear()
    if parallel == 1:
        for job in jobs:
            _, directory, run = job[:3]
            print(f"  {run.name} …", flush=True)
            print(outcome(run.name, directory, execute_run(*job)), flush=True)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        codes = pool.map(lambda job: (job[1], job[2].name, execute_run(*job)), jobs)
        try:
            for directory, name, code in codes:
                print(outcome(name, directory, code), flush=True)
        except KeyboardInterrupt:  # in this thread: stop the running fits (each saves a checkpoint), start no new one
            print(
                "  interrupted: waiting for the running fits to save their checkpoints; no new run starts", flush=True
            )
            stop_running_children()
            try:
                pool.shutdown(wait=True, cancel_futures=True)
            except KeyboardInterrupt:
                stop_running_children(kill=True)
                pool.shutdown(wait=True, cancel_futures=True)
            raise


def outcome(name: str, directory: Path, code: int) -> str:
    """The line a finished run prints: its recorded status, and where to look when it did not succeed."""
    detail = "" if code == 0 else f" (exit {code}, see {directory}/fit.log)"
    return f"  {name}: {read_status(directory)}{detail}"


def run_on_slurm(jobs: list[tuple], out: Path, parameters: dict[str, Any]) -> None:
    """One SLURM job array through submitit (``pip install 'lit-align[slurm]'``); waits for every job."""
    try:
        import submitit
    except ImportError as err:
        raise RuntimeError("executor='slurm' needs submitit: pip install 'lit-align[slurm]'") from err
    parameters = dict(parameters)
    cluster = parameters.pop("cluster", None)  # submitit's own: "local" runs the array here (tests)
    executor = submitit.AutoExecutor(folder=out / "slurm", cluster=cluster)
    executor.update_parameters(**parameters)
    submitted = executor.map_array(execute_run, *zip(*jobs, strict=True)) if jobs else []
    for job in submitted:
        job.result()


def main(args: list[str] | None = None) -> None:
    """``lit-align sweep SWEEP.yaml --out DIR [--parallel N] [--executor local|slurm] [--slurm KEY=VALUE ...]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="lit-align sweep", description=main.__doc__)
    parser.add_argument("sweep", help="the sweep file (YAML: config, set, grid or methods, seeds)")
    parser.add_argument("--out", required=True, help="the sweep directory (runs/, report/)")
    parser.add_argument("--parallel", type=int, default=1, help="local runs at a time (default 1)")
    parser.add_argument("--executor", choices=("local", "slurm"), default="local")
    parser.add_argument("--slurm", nargs="*", default=[], help="submitit parameters, e.g. slurm_partition=gpu")
    parser.add_argument("--dry_run", action="store_true", help="list the runs and their status, run nothing")
    options = parser.parse_args(args)
    sweep = Sweep.from_yaml(options.sweep)
    if options.dry_run:
        for required, required_out in sweep.requires:
            for run in Sweep.from_yaml(required).runs:
                print(f"(requires {required}) {run.name}\t{read_status(run_directory(required_out, run)) or 'pending'}")
        for run in sweep.runs:
            print(f"{run.name}\t{read_status(run_directory(Path(options.out), run)) or 'pending'}")
        return
    slurm = {}
    for item in options.slurm:
        key, _, value = item.partition("=")
        slurm[key] = yaml.safe_load(value)
    # Ctrl-C, and a SIGTERM (``kill``, a scheduler) alike, stop the sweep after its running fits saved a checkpoint.
    # Installed even where SIGINT is inherited ignored (a background job of a shell without job control), or the
    # sweep would go on to the next run after its fit stopped.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler)
    try:
        statuses = run_sweep(sweep, options.out, options.parallel, options.executor, slurm)
    except KeyboardInterrupt:
        again = shlex.join(["lit-align", "sweep", *(sys.argv[1:] if args is None else args)])
        print(f"lit-align sweep: interrupted; rerun the same command to resume: {again}", file=sys.stderr)
        sys.exit(130)
    failed = [name for name, status in statuses.items() if status != DONE]
    if failed:
        print(f"lit-align sweep: {len(failed)} run(s) not done: {failed}", file=sys.stderr)
        sys.exit(1)
