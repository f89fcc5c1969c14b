"""Multi-process runs (gloo on CPU): DDP and FSDP2 give what one process gives on the same global batch.

Marked ``distributed``: left out of a bare ``pytest`` (the quick loop), run by the README's test command and CI
(``-m "not slow"``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_align.models import load_tokenizer, tiny_llama

SCRIPTS = Path(__file__).parent / "scripts"
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed


def save_tiny(directory: Path, seed: int) -> str:
    tiny_llama(seed).save_pretrained(directory)
    load_tokenizer("tiny-llama").save_pretrained(directory)
    return str(directory)


def run_validation(devices: int, out: Path, *args: str) -> dict[str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "ddp_validate.py"), str(devices), str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def shared_data_present() -> bool:
    from lit_align.tasks import DEFAULT_MULTI30K, DEFAULT_SST2

    return DEFAULT_MULTI30K.is_dir() and any((DEFAULT_SST2 / name).is_file() for name in ("dev.tsv.gz", "dev.tsv"))


def test_ddp_metrics_equal_single_process(tmp_path, hh_dir):
    policy = save_tiny(tmp_path / "policy", seed=1)
    reference = save_tiny(tmp_path / "reference", seed=0)
    single = run_validation(1, tmp_path / "one.json", str(hh_dir), policy, reference)
    double = run_validation(2, tmp_path / "two.json", str(hh_dir), policy, reference)
    names = [
        "eval_loss",
        "eval_rewards/chosen",
        "eval_rewards/rejected",
        "eval_rewards/margins",
        "eval_rewards/accuracies",
        "eval_logps/chosen",
        "eval_logps/rejected",
        "eval_tax/heldout_perplexity",  # callbacks.TaskScore: statistics summed over ranks
    ]
    if shared_data_present():  # the script scores the tasks whose data a clone has
        names += ["eval_tax/sst2_accuracy", "eval_tax/multi30k_bleu_en_fr"]
    assert set(names) <= set(single)
    assert single["eval_rewards/margins"] != 0.0  # different policy and reference: a non-trivial comparison
    for name in names:
        assert double[name] == pytest.approx(single[name], rel=1e-5, abs=1e-6), name
    # prepare_data tokenized the validation split once, on rank 0; rank 1 loaded rank 0's cache
    logs = [json.loads((tmp_path / f"two.json.rank{rank}.tokenization.json").read_text()) for rank in (0, 1)]
    assert [(role, source) for role, source, _, _ in logs[0]] == [("val", "tokenized")]
    assert [(role, source) for role, source, _, _ in logs[1]] == [("val", "cache")]


def run_fsdp2(devices: int, out: Path, hh_dir: Path, export: Path, *strategy: str) -> dict[str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = str(SCRIPTS / "fsdp2_dpo.py")
    command = [sys.executable, script, str(devices), str(out), str(hh_dir), str(export), *strategy]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_fsdp2_training_and_export_match_a_single_process(tmp_path, hh_dir):
    from transformers import AutoModelForCausalLM

    single = run_fsdp2(1, tmp_path / "one.json", hh_dir, tmp_path / "one")
    sharded = run_fsdp2(2, tmp_path / "two.json", hh_dir, tmp_path / "two")
    assert sharded["sharded"] and not single["sharded"]
    assert single["eval_rewards/margins"] != 0.0  # three optimizer steps moved the policy
    for name in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies", "eval_logps/chosen"):
        assert sharded[name] == pytest.approx(single[name], rel=1e-4, abs=1e-5), name
    weights_one = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    weights_two = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    initial = tiny_llama(0).state_dict()  # the module's starting weights (model="tiny-llama", seed 0)
    assert initial.keys() <= weights_one.keys() <= weights_two.keys()
    from safetensors import safe_open

    with safe_open(tmp_path / "two" / "model.safetensors", "pt") as stored:  # the tied head is not written twice
        assert "lm_head.weight" not in stored.keys() and "model.embed_tokens.weight" in stored.keys()
    # the exported policy moved, and by the same update as one process (relative, as for every distributed test:
    # an elementwise 1e-5 check failed on Adam's sign-like first steps flipping tiny-gradient elements by ~lr)
    assert sum(float((weights_one[k] - v).abs().sum()) for k, v in initial.items()) > 0
    assert relative_update_error(weights_one, weights_two, initial) < 1e-4


def launch(script: str, world_size: int, *args: str) -> None:
    """Start ``world_size`` processes the way torchrun does (rank and rendezvous in the environment)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if world_size > 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), NODE_RANK="0")
    processes = [
        subprocess.Popen(
            [sys.executable, str(SCRIPTS / script), *args],
            env={**env, **({"RANK": str(rank), "LOCAL_RANK": str(rank)} if world_size > 1 else {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world_size)
    ]
    for rank, process in enumerate(processes):
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"rank {rank}: {stderr[-3000:]}"


CALLBACKS = ["elastic_reset", "interpolation", "reference_soup", "online_merging", "reference_sync"]


def test_every_callback_under_fsdp2_matches_one_process_and_resumes_from_sharded_checkpoints(tmp_path, real_hh_dir):
    models = [save_tiny(tmp_path / name, seed) for name, seed in (("base", 5), ("soup_a", 1), ("soup_b", 2))]
    for devices in (1, 2):
        (tmp_path / str(devices)).mkdir()
        launch("fsdp2_callbacks.py", devices, str(tmp_path / str(devices)), str(real_hh_dir), *models)
    for name in CALLBACKS:
        one = torch.load(tmp_path / "1" / f"{name}-full-1.pt")
        two = torch.load(tmp_path / "2" / f"{name}-full-2.pt")
        resumed = torch.load(tmp_path / "2" / f"{name}-resumed-2.pt")
        assert one.keys() == two.keys() == resumed.keys(), name
        for key, weight in one.items():
            # Adam divides by √v, so float noise in small gradients (sums in another order on 2 ranks) becomes
            # update noise of up to lr (1e-3); a sharding mistake moves whole tensors by lr or more
            difference = (two[key] - weight).abs()
            assert difference.max() < 1e-3 and difference.mean() < 2e-5, (name, key, difference.mean())
            assert torch.equal(resumed[key], two[key]), (name, key)  # the sharded checkpoint restored everything
        sizes = json.loads((tmp_path / "2" / f"{name}-sizes-2.json").read_text())
        assert sizes["local"] == sizes["whole"] // 2, (name, sizes)  # each rank keeps only its shard of a copy


def test_entanglement_monitor_under_ddp_and_fsdp2_matches_one_process(tmp_path, hh_dir):
    launch("entanglement_monitor.py", 1, str(tmp_path), str(hh_dir), "single")
    for strategy in ("ddp", "fsdp2"):
        launch("entanglement_monitor.py", 2, str(tmp_path), str(hh_dir), strategy)
    single = json.loads((tmp_path / "single-1.json").read_text())
    assert [entry["step"] for entry in single] == [0, 1, 2]
    assert single[0]["inner"] != 0.0 and single[-1]["logps_chosen"] != single[0]["logps_chosen"]
    for strategy in ("ddp", "fsdp2"):
        history = json.loads((tmp_path / f"{strategy}-2.json").read_text())
        assert [entry["step"] for entry in history] == [0, 1, 2], strategy
        for one, two in zip(single, history, strict=True):
            # step 0: the same weights, so only summation order differs; later steps: Adam turns float noise in
            # the 2-rank gradients into small weight differences. A shard counted once instead of summed over
            # ranks would halve the norms.
            tolerance = 1e-4 if one["step"] == 0 else 2e-2
            for key in ("inner", "norm_sq_chosen", "norm_sq_rejected", "cosine", "logps_chosen", "logps_rejected"):
                assert two[key] == pytest.approx(one[key], rel=tolerance), (strategy, one["step"], key)
            assert two["condition_failed"] == one["condition_failed"], (strategy, one["step"])


MODULES = ("sft", "dpo", "kto", "ppo", "rloo", "grpo", "dm")


def write_one_prompt_pairs(directory: Path) -> Path:
    """Four HH-format pairs sharing one prompt (so KTO's in-batch KL pairs do not depend on the rank split), with
    chosen answers of very different lengths (so a per-rank token mean would differ from the global one)."""
    prompt = "\n\nHuman: Tell me about your day.\n\nAssistant:"
    good = ["It was lovely, thanks for asking. I walked to the market, bought fresh bread and talked to friends all "
            "afternoon.", "Great!", "Wonderful, sunny and calm, with a long swim in the lake.", "Fine."]  # fmt: skip
    bad = ["Awful. Leave me alone.", "Terrible, everything broke.", "Bad, I hate it.", "Horrible and sad."]
    (directory / "helpful-base").mkdir(parents=True)
    with open(directory / "helpful-base" / "test.jsonl", "w") as handle:
        for chosen, rejected in zip(good, bad, strict=True):
            handle.write(json.dumps({"chosen": f"{prompt} {chosen}", "rejected": f"{prompt} {rejected}"}) + "\n")
    return directory


def relative_update_error(final_one: dict, final_two: dict, initial: dict, prefix: str = "") -> float:
    """‖Δ₂ − Δ₁‖ / ‖Δ₁‖ for the weight updates Δ = final − initial of two runs (over ``initial``'s keys).

    Not an elementwise comparison: Adam's first steps are ≈ lr·sign(g), so where |g| is tiny, float noise from
    summing gradients in another order (2 ranks vs 1) can flip single elements by ~lr. That moves this ratio by
    ~1e-6; a sharding or reduction mistake (a shard not updated, gradients summed instead of averaged) moves it by
    ~1."""
    difference = sum(float((final_two[prefix + k] - final_one[prefix + k]).double().pow(2).sum()) for k in initial)
    update = sum(float((final_one[prefix + k] - v).double().pow(2).sum()) for k, v in initial.items())
    return (difference / update) ** 0.5


def max_differences(out: Path, one: str, two: str) -> tuple[float, float]:
    """Largest difference of the synced metrics of the last step (relative to max(1, |value|)) between two runs, and the
    relative difference of their policy updates from the initial tiny-llama weights."""
    metrics_one, metrics_two = (json.loads((out / f"{tag}.json").read_text()) for tag in (one, two))
    # training metrics are each step's value over every rank's rows; dpg/* are rank 0's own counters
    names = [name for name in metrics_one if not name.startswith("dpg/")]
    assert names and set(names) <= set(metrics_two), (one, two)
    weights_one, weights_two = torch.load(out / f"{one}.pt"), torch.load(out / f"{two}.pt")
    assert weights_one.keys() == weights_two.keys(), (one, two)
    metric_gap = max(abs(metrics_two[n] - metrics_one[n]) / max(1.0, abs(metrics_one[n])) for n in names)
    trained = {k: v for k, v in weights_one.items() if k.startswith("policy.") and "lora_" not in k}
    if len(trained) < len([k for k in weights_one if k.startswith("policy.")]):  # LoRA: the adapters are trained
        trained = {k: v for k, v in weights_one.items() if k.startswith("policy.") and "lora_" in k}
        initial = {k: torch.zeros_like(v) if "lora_B" in k else None for k, v in trained.items()}
        initial = {k: v for k, v in initial.items() if v is not None}  # B starts at 0: its update is itself
        return metric_gap, relative_update_error(weights_one, weights_two, initial)
    base = {f"policy.{k}": v for k, v in tiny_llama(0).state_dict().items()}
    return metric_gap, relative_update_error(weights_one, weights_two, base)


def test_every_module_under_ddp_and_fsdp2_matches_one_process_and_resumes(tmp_path):
    data = write_one_prompt_pairs(tmp_path / "data")
    launch("scale_modules.py", 1, str(tmp_path), str(data), "single")
    for strategy in ("ddp", "fsdp2"):
        launch("scale_modules.py", 2, str(tmp_path), str(data), strategy)
    base, report = tiny_llama(0).state_dict(), []
    for name in MODULES:
        single = torch.load(tmp_path / f"{name}-single-1.pt")
        moved = max(float((single[f"policy.{key}"] - value).abs().max()) for key, value in base.items())
        assert moved > 5e-4, f"{name}: two steps at lr 1e-3 did not move the policy ({moved})"
        metrics = json.loads((tmp_path / f"{name}-single-1.json").read_text())
        assert any(abs(v) > 1e-3 for k, v in metrics.items() if k != "learning_rate"), name  # real numbers
        for strategy in ("ddp", "fsdp2"):
            metric_gap, weight_gap = max_differences(tmp_path, f"{name}-single-1", f"{name}-{strategy}-2")
            report.append(f"{name} {strategy}: metrics {metric_gap:.1e}, weight update {weight_gap:.1e} (relative)")
            # measured <= 1e-5 (float order); a reduction mistake gives ~1
            assert metric_gap < 1e-3 and weight_gap < 1e-3, report[-1]
        resumed = torch.load(tmp_path / f"{name}-fsdp2-2-resumed.pt")
        continuous = torch.load(tmp_path / f"{name}-fsdp2-2.pt")
        gap = max(float((resumed[k].float() - continuous[k].float()).abs().max()) for k in continuous)
        assert gap < 1e-6, f"{name}: resumed from the sharded checkpoint of step 1 differs by {gap}"
    print("\n".join(report))


def test_lora_with_every_module_under_ddp_matches_one_process(tmp_path):
    data = write_one_prompt_pairs(tmp_path / "data")
    launch("scale_modules.py", 1, str(tmp_path), str(data), "single", "lora")
    launch("scale_modules.py", 2, str(tmp_path), str(data), "ddp", "lora")
    base = tiny_llama(0).state_dict()
    for name in MODULES:
        metric_gap, weight_gap = max_differences(tmp_path, f"{name}-single-lora-1", f"{name}-ddp-lora-2")
        assert metric_gap < 1e-3 and weight_gap < 1e-3, (name, metric_gap, weight_gap)
        weights = torch.load(tmp_path / f"{name}-ddp-lora-2.pt")
        assert not any(key.startswith("reference.") for key in weights), name  # the reference = adapters off
        adapters = [key for key in weights if "lora_B" in key and key.startswith("policy.")]
        assert adapters and all(weights[key].abs().max() > 0 for key in adapters), name  # B starts at 0: trained
        frozen = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in weights.items()
                  if k.startswith("policy.") and "lora_" not in k}  # fmt: skip
        for key, value in base.items():
            torch.testing.assert_close(frozen[f"policy.{key}"], value, rtol=0, atol=0, msg=f"{name}: {key}")


def test_sharded_generation_matches_one_process_and_gathers_once_per_call(tmp_path):
    launch("sharded_generation.py", 1, str(tmp_path))
    launch("sharded_generation.py", 2, str(tmp_path))
    one = json.loads((tmp_path / "generation-1.json").read_text())
    two = json.loads((tmp_path / "generation-2.json").read_text())
    assert two["sharded"] and not one["sharded"] and two["fsdp_units"] >= 3
    assert two["True"]["sequences"] == one["True"]["sequences"]
    assert two["False"]["sequences"] == one["True"]["sequences"]
    assert two["True"]["response_tokens"] == 16  # 2 prompts × 8 new tokens
    assert two["True"]["all_gathers"] == two["fsdp_units"]  # each unit gathered once for the whole call
    assert two["False"]["all_gathers"] > 8  # otherwise the layers are gathered again for every token


def cli_fit(tmp_path: Path, hh_dir: Path, name: str, *extra: str) -> Path:
    """`lit-align fit` on configs/hh/dpo.yaml + a strategy config, 2 CPU processes that Lightning launches itself."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / name
    command = [
        "lit-align", "fit", "--config", str(REPO / "configs/hh/dpo.yaml"), *extra,
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_steps", "2",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(out), "--trainer.default_root_dir", str(out),
        "--model.init_args.model", "tiny-llama", "--model.init_args.export_dir", str(out / "export"),
        "--data.init_args.data_path", str(hh_dir), "--data.init_args.train_split", "test",
        "--data.init_args.val_split", "null", "--data.init_args.holdout", "8", "--data.init_args.limit_train", "8",
        "--data.init_args.batch_size", "2", "--data.init_args.max_length", "48",
        "--data.init_args.max_prompt_length", "32",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def last_eval(out: Path) -> dict[str, float]:
    import csv

    rows = list(csv.DictReader(next(out.rglob("metrics.csv")).open()))
    return {k: float(v) for row in rows for k, v in row.items() if k.startswith("eval_") and v}


def test_strategy_configs_train_from_the_cli_with_bf16_mixed_and_export(tmp_path, hh_dir):
    """configs/strategies/{ddp,fsdp2}.yaml stacked onto a benchmark config, as the README shows, with their
    bf16-mixed precision (CPU autocast here); FSDP2 with and without activation checkpointing."""
    from transformers import AutoModelForCausalLM

    ddp = cli_fit(tmp_path, hh_dir, "ddp", "--config", str(REPO / "configs/strategies/ddp.yaml"),
                  "--trainer.strategy.init_args.process_group_backend", "gloo")  # fmt: skip
    fsdp2_config = ("--config", str(REPO / "configs/strategies/fsdp2.yaml"))
    fsdp2 = cli_fit(tmp_path, hh_dir, "fsdp2", *fsdp2_config)
    checkpointing = ("--model.init_args.gradient_checkpointing", "true")
    checkpointed = cli_fit(tmp_path, hh_dir, "fsdp2_gc", *fsdp2_config, *checkpointing)
    results = {name: last_eval(out) for name, out in (("ddp", ddp), ("fsdp2", fsdp2), ("gc", checkpointed))}
    assert results["ddp"]["eval_rewards/margins"] != 0.0  # two steps moved the policy away from the reference
    for name in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen"):
        # bf16 autocast: DDP and FSDP2 differ in reduction order only, checkpointing recomputes the same forward
        assert results["fsdp2"][name] == pytest.approx(results["ddp"][name], rel=2e-2, abs=2e-3), name
        assert results["gc"][name] == pytest.approx(results["fsdp2"][name], rel=1e-5, abs=1e-6), name
    assert next(fsdp2.rglob("*.ckpt")).is_dir()  # FSDP2 checkpoints are sharded: one directory, a file per rank
    exported = AutoModelForCausalLM.from_pretrained(fsdp2 / "export")  # one consolidated HF directory
    assert exported.config.num_hidden_layers == 2
