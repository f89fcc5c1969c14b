"""The bad-input table: every bad input a new user was seen to try, each with the error (or warning) it must get.

One row per input: ``(id, trigger, expected exception or warning class, regex of the message)``. A trigger takes a
fresh temporary directory and does what the user did: constructs a module, DataModule or callback with a bad
argument, reads a bad data file, loads a mistyped model, runs a reward that returns garbage. The message must name
what the user typed (the argument and its value, the file and the row, the reward and the rows) rather than fail
deep inside a third-party library, or succeed at nothing.

Everything runs offline, on ``tiny-llama`` or no
model at all, in well under a minute.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
from torch import nn

from callbacks import ElasticReset, OnlineMerging, ReferenceSoup, ReferenceSync
from datamodules import ControlledGenerationDataModule, DataValidationError, HHDataModule
from lit_align import DPOModule, GRPOModule, KTOModule, PPOModule, RewardModelModule, SFTModule
from lit_align.distribution_matching import DistributionMatchingModule
from lit_align.ebm import KLControlTarget, PointwiseConstraint, WordFeature, WordListFeature
from lit_align.generation import Completions
from lit_align.models import apply_lora, load_causal_lm, load_tokenizer, tiny_llama
from lit_align.rewards import CallableReward, ClassifierReward, RewardError, RewardFunction, check_reward_scores

TINY = "tiny-llama"


class Case(NamedTuple):
    """One bad input: what the user did (``trigger(tmp_path)``) and what they must be told."""

    id: str
    trigger: Callable[[Path], object]
    expected: type[BaseException] | type[Warning]
    message: str  # a regex searched in the message


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Hub access off for every case (as in CI), whatever the environment says: no case may wait on the network."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


# ---- small builders ------------------------------------------------------------------------------------------


def hh_row(i: int, chosen: str | None = None, rejected: str | None = None) -> dict:
    prompt = f"\n\nHuman: Tell me about number {i}.\n\nAssistant:"
    return {
        "chosen": prompt + (chosen if chosen is not None else f" Here is a good answer about {i}."),
        "rejected": prompt + (rejected if rejected is not None else f" No idea, go away {i}."),
    }


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    """Write raw lines (str as UTF-8, bytes as they are); gzip when the name ends in .gz."""
    data = b"".join((line.encode() if isinstance(line, str) else line) + b"\n" for line in lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def good_lines(count: int = 2) -> list[str]:
    return [json.dumps(hh_row(i)) for i in range(1, count + 1)]


def read_hh(path: Path | str, **kwargs) -> None:
    """``HHDataModule(data_path=path).setup()``: reads and validates every row, no tokenizer needed."""
    kwargs.setdefault("val_split", None)
    kwargs.setdefault("train_split", "test")
    HHDataModule(data_path=str(path), **kwargs).setup()


def bad_row(row: dict | str) -> Callable[[Path], None]:
    """A file of two good HH rows and then ``row`` (a dict as JSON, a str verbatim)."""

    def trigger(tmp: Path) -> None:
        line = row if isinstance(row, str) else json.dumps(row)
        read_hh(write_lines(tmp / "test.jsonl", [*good_lines(), line]))

    return trigger


def zero_byte_file(tmp: Path) -> None:
    (tmp / "test.jsonl").write_bytes(b"")
    read_hh(tmp / "test.jsonl")


def truncated_gzip(tmp: Path) -> None:
    path = write_lines(tmp / "t" / "test.jsonl.gz", good_lines(50))
    path.write_bytes(path.read_bytes()[:60])  # a download cut short
    read_hh(tmp / "t")


def bad_file(lines: list[str | bytes], name: str = "test.jsonl") -> Callable[[Path], None]:
    def trigger(tmp: Path) -> None:
        read_hh(write_lines(tmp / name, lines))

    return trigger


def hh_dir(tmp: Path) -> Path:
    """``<tmp>/hh/helpful-base/test.jsonl`` with eight good pairs."""
    write_lines(tmp / "hh" / "helpful-base" / "test.jsonl", good_lines(8))
    return tmp / "hh"


def construct(module_class: type, **kwargs) -> Callable[[Path], object]:
    """Construct ``module_class(model="tiny-llama", **kwargs)``: argument checks run before any model loads."""
    return lambda tmp: module_class(**{"model": TINY, **kwargs})


def make(factory: Callable, *args, **kwargs) -> Callable[[Path], object]:
    return lambda tmp: factory(*args, **kwargs)


def length_reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


WORD_TARGET = PointwiseConstraint({"amazing": WordFeature("amazing")})


# ---- model ids ---------------------------------------------------------------------------------------------------


def mistyped_output_dir(tmp: Path) -> None:
    (tmp / "outputs" / "hh_sft" / "model").mkdir(parents=True)  # what the user meant
    SFTModule(model="./outputs/hh_sft/modle")  # the tokenizer is loaded at construction: it fails there


def empty_model_dir(tmp: Path) -> None:
    (tmp / "exported").mkdir()
    load_causal_lm(str(tmp / "exported"))


def weights_without_tokenizer(tmp: Path) -> None:
    (tmp / "weights").mkdir()
    (tmp / "weights" / "model.safetensors").write_bytes(b"")
    load_tokenizer(str(tmp / "weights"))


def checkpoint_as_model(tmp: Path) -> None:
    (tmp / "last.ckpt").write_bytes(b"not really a checkpoint")
    load_causal_lm(str(tmp / "last.ckpt"))


MODEL_IDS = [
    Case(
        "model-dir-typo",
        mistyped_output_dir,
        FileNotFoundError,
        r"^no such directory or Hub id: \./outputs/hh_sft/modle \(did you mean outputs/hh_sft/model\?\)$",
    ),
    Case(
        "model-absolute-path-missing",
        make(load_causal_lm, "/no/such/dir/model"),
        FileNotFoundError,
        r"^no such directory or Hub id: /no/such/dir/model \(",
    ),
    Case(
        "model-home-path-missing",
        make(load_tokenizer, "~/no_such_lit_align_model"),
        FileNotFoundError,
        r"^no such directory or Hub id: ~/no_such_lit_align_model",
    ),
    Case(
        "model-hub-id-offline-not-cached",
        make(load_tokenizer, "no-such-org/no-such-model"),
        FileNotFoundError,
        r"no such directory or Hub id: no-such-org/no-such-model: .*not in the local cache while offline mode is on",
    ),
    Case(
        "model-alias-typo",
        make(load_causal_lm, "tiny_llama"),
        FileNotFoundError,
        r"no such directory or Hub id: tiny_llama: .*offline mode is on .*did you mean 'tiny-llama'\?",
    ),
    Case(
        "model-invalid-hub-id",
        make(load_tokenizer, "my model!"),
        FileNotFoundError,
        r"^no such directory or Hub id: my model!",
    ),
    Case("model-empty-name", make(load_tokenizer, ""), ValueError, r"tokenizer: expected a local directory, a Hub id"),
    Case(
        "model-dir-without-config",
        empty_model_dir,
        FileNotFoundError,
        r"exported is a directory but holds no config\.json: not a Hugging Face model directory \(found: nothing\)",
    ),
    Case(
        "tokenizer-dir-without-tokenizer",
        weights_without_tokenizer,
        FileNotFoundError,
        r"weights is a directory but holds no tokenizer files \(found: model\.safetensors\)",
    ),
    Case(
        "model-is-a-checkpoint-file",
        checkpoint_as_model,
        NotADirectoryError,
        r"last\.ckpt is a file, not a model directory \(a Lightning checkpoint: export it",
    ),
    Case(
        "model-bad-dtype",
        make(load_causal_lm, TINY, dtype="fp16"),
        ValueError,
        r"dtype='fp16' is not a floating torch dtype; use float32, bfloat16 or float16",
    ),
    Case(
        "classifier-reward-dir-typo",
        make(ClassifierReward, "./classifiers/imdb-sentimnet"),
        FileNotFoundError,
        r"^no such directory or Hub id: \./classifiers/imdb-sentimnet",
    ),
    Case(
        "lora-unknown-setting",
        lambda tmp: apply_lora(tiny_llama(), {"rank": 8}),
        ValueError,
        r"lora: unknown settings \['rank'\]; valid: \['r', 'alpha', 'dropout', 'target_modules', 'lora_alpha', "
        r".*'use_dora'",
    ),
]


# ---- module arguments (checked at construction, before any model loads) ----------------------------------------

MODULE_ARGUMENTS = [
    Case("dpo-beta-zero", construct(DPOModule, beta=0.0), ValueError, r"beta must be > 0, got 0\.0"),
    Case("dpo-beta-negative", construct(DPOModule, beta=-0.1), ValueError, r"beta must be > 0, got -0\.1"),
    Case(
        "dpo-unknown-loss",
        construct(DPOModule, loss_type="dpo"),
        ValueError,
        r"Unknown preference loss_type 'dpo'; valid names are: .*sigmoid",
    ),
    Case(
        "dpo-hinge-with-label-smoothing",
        construct(DPOModule, loss_type="hinge", label_smoothing=0.1),
        ValueError,
        r"loss_type 'hinge' does not support label_smoothing \(got 0\.1\); losses that do: ",
    ),
    Case(
        "dpo-label-smoothing-half",
        construct(DPOModule, label_smoothing=0.5),
        ValueError,
        r"label_smoothing .* must be in \[0, 0\.5\), got 0\.5",
    ),
    Case(
        "dpo-simpo-gamma-without-simpo",
        construct(DPOModule, simpo_gamma=1.0),
        ValueError,
        r"simpo_gamma=1\.0 is used by loss_type 'simpo' only, not 'sigmoid'",
    ),
    Case(
        "dpo-simpo-gamma-nan",
        construct(DPOModule, loss_type="simpo", simpo_gamma=math.nan),
        ValueError,
        r"simpo_gamma .* must be a finite number, got nan",
    ),
    Case(
        "dpo-normalization-parameters-without-normalizing",
        construct(DPOModule, normalization_parameters="layers"),
        ValueError,
        r"normalization_parameters='layers' is used only with normalize_pair_gradients=True",
    ),
    Case(
        "dpo-precompute-batch-size-zero",
        construct(DPOModule, precompute_ref_logps=True, precompute_batch_size=0),
        ValueError,
        r"precompute_batch_size must be >= 1 \(or None\), got 0",
    ),
    Case("kto-beta-zero", construct(KTOModule, beta=0.0), ValueError, r"beta must be > 0, got 0\.0"),
    Case(
        "kto-desirable-weight-zero",
        construct(KTOModule, desirable_weight=0.0),
        ValueError,
        r"desirable_weight .* must be > 0, got 0\.0",
    ),
    Case(
        "kto-constant-schedule-with-warmup",
        construct(KTOModule, lr_scheduler="constant", warmup_steps=10),
        ValueError,
        r"lr_scheduler 'constant' ignores warm-up \(warmup_steps=10",
    ),
    Case(
        "reward-model-negative-centring",
        construct(RewardModelModule, center_rewards_coefficient=-0.01),
        ValueError,
        r"center_rewards_coefficient must be >= 0, got -0\.01",
    ),
    Case("sft-learning-rate-zero", construct(SFTModule, learning_rate=0.0), ValueError, r"learning_rate must be > 0"),
    Case(
        "sft-learning-rate-negative",
        construct(SFTModule, learning_rate=-1e-5),
        ValueError,
        r"learning_rate must be > 0, got -1e-05",
    ),
    Case(
        "sft-unknown-scheduler",
        construct(SFTModule, lr_scheduler="cosine_annealing"),
        ValueError,
        r"lr_scheduler 'cosine_annealing' is unknown; valid names: .*cosine.*constant_with_warmup",
    ),
    Case(
        "sft-warmup-ratio-above-one",
        construct(SFTModule, warmup_ratio=1.5),
        ValueError,
        r"warmup_ratio must be in \[0, 1\], got 1\.5",
    ),
    Case(
        "grpo-beta-negative",
        construct(GRPOModule, reward_funcs=length_reward, beta=-0.1),
        ValueError,
        r"GRPOModule: beta must be >= 0, got -0\.1",
    ),
    Case(
        "grpo-beta-nan",
        construct(GRPOModule, reward_funcs=length_reward, beta=math.nan),
        ValueError,
        r"beta must be >= 0, got nan",
    ),
    Case(
        "grpo-one-generation",
        construct(GRPOModule, reward_funcs=length_reward, num_generations=1),
        ValueError,
        r"num_generations must be >= 2 .*got 1",
    ),
    Case(
        "grpo-no-reward-functions",
        construct(GRPOModule, reward_funcs=[]),
        ValueError,
        r"reward_funcs is empty",
    ),
    Case(
        "grpo-weights-count",
        construct(GRPOModule, reward_funcs=[length_reward], reward_weights=[1.0, 2.0]),
        ValueError,
        r"2 reward_weights for 1 reward_funcs",
    ),
    Case(
        "grpo-reward-not-an-import-path",
        construct(GRPOModule, reward_funcs="length_reward"),
        ValueError,
        r"reward function 'length_reward' is not an import path like 'package\.module\.function'",
    ),
    Case(
        "grpo-max-grad-norm-zero",
        construct(GRPOModule, reward_funcs=length_reward, max_grad_norm=0.0),
        ValueError,
        r"max_grad_norm must be > 0 \(or None: no clipping\), got 0\.0",
    ),
    Case(
        "grpo-negative-missing-eos-penalty",
        construct(GRPOModule, reward_funcs=length_reward, missing_eos_penalty=-1.0),
        ValueError,
        r"missing_eos_penalty must be >= 0 \(it is subtracted\), got -1\.0",
    ),
    Case(
        "grpo-temperature-zero",
        construct(GRPOModule, reward_funcs=length_reward, sampling={"temperature": 0.0}),
        ValueError,
        r"sampling: temperature must be > 0, got 0\.0",
    ),
    Case(
        "ppo-rloo-one-sample",
        construct(PPOModule, reward=CallableReward(length_reward), advantage_estimator="rloo"),
        ValueError,
        r"advantage_estimator='rloo' needs samples_per_prompt >= 2",
    ),
    Case(
        "ppo-epochs-zero",
        construct(PPOModule, reward=CallableReward(length_reward), ppo_epochs=0),
        ValueError,
        r"ppo_epochs must be >= 1, got 0",
    ),
    Case(
        "ppo-unknown-sampling-setting",
        construct(PPOModule, reward=CallableReward(length_reward), sampling={"top_q": 0.9}),
        ValueError,
        r"sampling: unknown settings \['top_q'\]",
    ),
    Case(
        "dm-proposal-update-every-zero",
        construct(DistributionMatchingModule, target=WORD_TARGET, proposal_update_every=0),
        ValueError,
        r"proposal_update_every must be >= 1, got 0",
    ),
    Case(
        "dm-clip-weights-zero",
        construct(DistributionMatchingModule, target=WORD_TARGET, clip_weights=0.0),
        ValueError,
        r"clip_weights must be > 0 \(or None: no clipping\), got 0\.0",
    ),
    Case(
        "dm-moment-matching-samples-zero",
        construct(DistributionMatchingModule, target=WORD_TARGET, moment_matching_samples=0),
        ValueError,
        r"moment_matching_samples must be >= 1, got 0",
    ),
    Case(
        "ebm-kl-control-beta-zero",
        make(KLControlTarget, CallableReward(length_reward), beta=0.0),
        ValueError,
        r"beta must be > 0, got 0\.0",
    ),
    Case("ebm-empty-word-list", make(WordListFeature, []), ValueError, r"WordListFeature needs at least one word"),
]

PPO_ARGUMENTS_TODO = [
    pytest.param(
        Case(
            "ppo-negative-kl-coef",
            construct(PPOModule, reward=CallableReward(length_reward), kl_coef=-0.1),
            ValueError,
            r"kl_coef must be >= 0, got -0\.1",
        ),
    ),
    pytest.param(
        Case(
            "ppo-cliprange-zero",
            construct(PPOModule, reward=CallableReward(length_reward), cliprange=0.0),
            ValueError,
            r"cliprange must be > 0, got 0\.0",
        ),
    ),
    pytest.param(
        Case(
            "ppo-gamma-above-one",
            construct(PPOModule, reward=CallableReward(length_reward), gamma=1.5),
            ValueError,
            r"gamma must be in \[0, 1\], got 1\.5",
        ),
    ),
]


# ---- callbacks --------------------------------------------------------------------------------------------------


def merging_with_the_policy_as_base(tmp: Path) -> None:
    """OnlineMerging whose base model is the policy itself: τ = 0, so the merge adds nothing."""
    module = SFTModule(model=TINY)
    module.build_models()
    OnlineMerging(base_model=TINY, alpha=0.1, keep=0.5).on_configure_model(None, module)


CALLBACKS = [
    Case(
        "online-merging-unknown-method",
        make(OnlineMerging, TINY, method="dare"),
        ValueError,
        r"method must be 'ondare' or 'onties', got 'dare'",
    ),
    Case(
        "online-merging-keep-zero",
        make(OnlineMerging, TINY, keep=0.0),
        ValueError,
        r"need 0 < keep <= 1 and 0 <= alpha <= 1, got keep=0\.0",
    ),
    Case(
        "online-merging-tau-all-zero",
        merging_with_the_policy_as_base,
        UserWarning,
        r"τ = θ_SFT − θ_base is all zeros: base_model 'tiny-llama' has the same weights as the initial policy, "
        r"so merging with τ is a no-op",
    ),
    Case(
        "elastic-reset-every-zero",
        make(ElasticReset, reset_every=0),
        ValueError,
        r"reset_every \(0\) and ema_every \(1\) must be >= 1",
    ),
    Case("elastic-reset-decay-above-one", make(ElasticReset, 10, decay=1.5), ValueError, r"decay must be in \[0, 1\]"),
    Case("reference-sync-alpha", make(ReferenceSync, alpha=1.5), ValueError, r"need 0 <= alpha <= 1"),
    Case("reference-soup-no-checkpoints", make(ReferenceSoup, []), ValueError, r"give at least one checkpoint"),
    Case(
        "reference-soup-weights",
        make(ReferenceSoup, ["a.ckpt", "b.ckpt"], weights=[0.7, 0.7]),
        ValueError,
        r"weights must be non-negative and sum to 1, got \[0\.7, 0\.7\]",
    ),
]


# ---- DataModule arguments -------------------------------------------------------------------------------------


DATAMODULE_ARGUMENTS = [
    Case(
        "data-prompt-longer-than-sequence",
        lambda tmp: HHDataModule(data_path=str(tmp), max_length=64, max_prompt_length=64),
        ValueError,
        r"max_prompt_length \(64\) must be < max_length \(64\)",
    ),
    Case(
        "data-unknown-mode",
        lambda tmp: HHDataModule(data_path=str(tmp), mode="dpo"),
        ValueError,
        r"mode='dpo' is not a data mode; expected one of",
    ),
    Case(
        "data-batch-size-zero",
        lambda tmp: HHDataModule(data_path=str(tmp), batch_size=0),
        ValueError,
        r"batch_size and eval_batch_size must be >= 1",
    ),
    Case(
        "data-negative-holdout",
        lambda tmp: HHDataModule(data_path=str(tmp), holdout=-1),
        ValueError,
        r"holdout must be >= 0, got -1",
    ),
    Case(
        "controlled-no-train-rows",
        make(ControlledGenerationDataModule, num_train=0),
        ValueError,
        r"num_train must be >= 1 and num_val >= 0, got 0",
    ),
    Case(
        "data-unpaired-batch-of-one",
        lambda tmp: HHDataModule(data_path=str(tmp), batch_size=1).attach(SimpleNamespace(eos_token_id=2), "unpaired"),
        ValueError,
        r"unpaired \(KTO-style\) batches need >= 2 rows",
    ),
    Case(
        "data-tokenizer-without-eos",
        lambda tmp: HHDataModule(data_path=str(tmp)).attach(SimpleNamespace(eos_token_id=None), "pair"),
        ValueError,
        r"the tokenizer has no eos_token_id",
    ),
    pytest.param(
        Case(
            "data-limit-train-zero",
            lambda tmp: HHDataModule(data_path=str(tmp), limit_train=0),
            ValueError,
            r"limit_train must be >= 1",
        ),
    ),
    pytest.param(
        Case(
            "data-negative-max-prompt-length",
            lambda tmp: HHDataModule(data_path=str(tmp), max_prompt_length=-1),
            ValueError,
            r"max_prompt_length must be >= 1, got -1",
        ),
    ),
]


# ---- data files ---------------------------------------------------------------------------------------------------

ROW3 = r"test\.jsonl: row 3: "
DATA_FILES = [
    Case(
        "row-missing-field",
        bad_row({"chosen": hh_row(3)["chosen"]}),
        DataValidationError,
        ROW3 + r"field 'rejected': expected a non-empty string, got missing or null$",
    ),
    Case(
        "row-wrong-type",
        bad_row({"chosen": 5, "rejected": hh_row(3)["rejected"]}),
        DataValidationError,
        ROW3 + r"field 'chosen': expected a non-empty string, got int$",
    ),
    Case(
        "row-null-field",
        bad_row({"chosen": None, "rejected": hh_row(3)["rejected"]}),
        DataValidationError,
        ROW3 + r"field 'chosen': expected a non-empty string, got missing or null$",
    ),
    Case(
        "row-empty-string",
        bad_row({"chosen": "", "rejected": hh_row(3)["rejected"]}),
        DataValidationError,
        ROW3 + r"field 'chosen': expected a non-empty string, got an empty string$",
    ),
    Case(
        "row-no-assistant-turn",
        bad_row({"chosen": "\n\nHuman: hi", "rejected": hh_row(3)["rejected"]}),
        DataValidationError,
        ROW3 + r"field 'chosen': no '\\n\\nAssistant:' turn in the dialogue",
    ),
    Case(
        "row-mismatched-prompts",
        bad_row({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}),
        DataValidationError,
        ROW3 + r"field 'rejected': does not share a prompt with 'chosen' \(mismatched prefix",
    ),
    Case(
        "row-empty-answer",
        bad_row(hh_row(3, chosen="")),
        DataValidationError,
        ROW3 + r"field 'chosen': empty final Assistant answer",
    ),
    Case("row-not-json", bad_row('{"chosen": '), DataValidationError, ROW3 + r"invalid JSON: "),
    Case("row-not-an-object", bad_row("[1, 2]"), DataValidationError, ROW3 + r"expected a JSON object, got list"),
    Case(
        "row-not-utf8",
        bad_file([*good_lines(), b'{"chosen": "caf\xe9"}']),
        DataValidationError,
        ROW3 + r"not valid UTF-8 \(byte e9 at byte 16 of the line\); save the file as UTF-8",
    ),
    Case(
        "row-not-utf8-gzip",
        bad_file([good_lines()[0], b"\xff\xfe{}"], name="test.jsonl.gz"),
        DataValidationError,
        r"test\.jsonl\.gz: row 2: not valid UTF-8 \(byte ff at byte 1 of the line\)",
    ),
    Case(
        "file-zero-bytes",
        zero_byte_file,
        DataValidationError,
        r"test\.jsonl: the file is empty \(0 bytes\)",
    ),
    Case(
        "file-only-blank-lines",
        bad_file(["", "   ", ""]),
        DataValidationError,
        r"test\.jsonl: the file is empty \(no rows, only blank lines\)",
    ),
    Case(
        "file-truncated-gzip",
        truncated_gzip,
        DataValidationError,
        r"test\.jsonl\.gz: cannot read as JSON lines",
    ),
    Case(
        "file-not-json-at-all",
        bad_file(["id,chosen,rejected", "1,a,b"]),
        DataValidationError,
        r"test\.jsonl: row 1: invalid JSON",
    ),
    Case(
        "data-path-typo",
        lambda tmp: read_hh("./data/hh_rlfh"),
        FileNotFoundError,
        r"^no such file or directory: \./data/hh_rlfh \(data_path\); it is not a Hub dataset id either$",
    ),
    Case(
        "data-file-typo",
        lambda tmp: read_hh(tmp / "tset.jsonl"),
        FileNotFoundError,
        r"no such file or directory: .*tset\.jsonl \(data_path\)",
    ),
    Case(
        "data-hub-id-offline",
        lambda tmp: read_hh("no-such-org-xyz/no-such-dataset"),
        DataValidationError,
        r"no-such-org-xyz/no-such-dataset: no local file or directory of that name, .*not in the local cache while "
        r"offline mode is on",
    ),
    Case(
        "data-split-name-typo",
        lambda tmp: read_hh(hh_dir(tmp), train_split="tset"),
        FileNotFoundError,
        r"no subset has a 'tset' split \(subsets: \['helpful-base'\]\)",
    ),
    Case(
        "data-subset-typo",
        lambda tmp: read_hh(hh_dir(tmp), subsets=["helpfull-base"]),
        FileNotFoundError,
        r"no subset directory \['helpfull-base'\] \(found: \['helpful-base'\]\)",
    ),
    Case(
        "data-single-file-with-val-split",
        lambda tmp: read_hh(write_lines(tmp / "pairs.jsonl", good_lines()), val_split="test", train_split="train"),
        ValueError,
        r"pairs\.jsonl is a single file, used as the train split; it has no split 'test'",
    ),
    Case(
        "data-no-usable-rows",
        bad_file([json.dumps({"chosen": hh_row(1)["chosen"], "rejected": hh_row(1)["chosen"]})]),
        ValueError,
        r"HHDataModule: split 'test' of .*test\.jsonl has no usable rows: all 1 were skipped \(1 × chosen == rejected",
    ),
    Case(
        "data-holdout-eats-everything",
        lambda tmp: read_hh(write_lines(tmp / "test.jsonl", good_lines(4)), holdout=4),
        ValueError,
        r"holdout=4 leaves no train rows \(the train split has 4\)",
    ),
]


# ---- rewards ------------------------------------------------------------------------------------------------------

COMPLETIONS = ["a fine day", "so bad", "meh"]


def as_text(prompts, completions):
    return ["good" for _ in completions]


def one_score(prompts, completions):
    return [1.0]


def nan_for_short(prompts, completions):
    return [float("nan") if len(c) < 5 else 1.0 for c in completions]


def infinite(prompts, completions):
    return torch.tensor([1.0, math.inf, 0.0])


def scalar(prompts, completions):
    return 1.0


def matrix(prompts, completions):
    return torch.ones(len(completions), 2)


class BrokenSentiment(RewardFunction):
    """A reward module whose score is NaN for every completion (a division by zero in its own code)."""

    def score(self, prompts, completions, batch):
        return torch.zeros(len(completions)) / 0.0


class StringReward(nn.Module):
    """Not a ``RewardFunction``: a plain module that returns labels instead of numbers (PPO's own check)."""

    def forward(self, prompts, completions, batch=None):
        return ["positive" for _ in completions]


def score_with(fn: Callable, batch: dict | None = None) -> Callable[[Path], object]:
    return lambda tmp: CallableReward(fn, pass_batch=False)(["p"] * len(COMPLETIONS), COMPLETIONS, batch)


def grpo_scores(fn: Callable) -> Callable[[Path], object]:
    """GRPO's scoring step on hand-made completions (two per prompt)."""

    def trigger(tmp: Path) -> object:
        module = GRPOModule(model=TINY, reward_funcs=[fn], num_generations=2)
        tokenizer = module.tokenizer
        rows = [tokenizer(c, add_special_tokens=False).input_ids for c in ["yes", "no", "maybe", "sure"]]
        width = max(len(r) for r in rows)
        response = torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        sequences = torch.cat([torch.ones(4, 1, dtype=torch.long), response], dim=1)
        attention = torch.cat([torch.ones(4, 1, dtype=torch.long), mask], dim=1)
        batch = {"prompt": ["q1", "q1", "q2", "q2"], "index": torch.tensor([7, 7, 9, 9])}
        sample = Completions(
            sequences, attention, mask, 1, batch["prompt"], ["yes", "no", "maybe", "sure"], torch.ones(4).bool(), batch
        )
        return module.score(sample)

    return trigger


def grpo_nan(prompts, completions, **kwargs):
    return [1.0, 0.0, float("nan"), None]


def ppo_step_with(reward: nn.Module) -> Callable[[Path], object]:
    """One PPO training step on tiny-llama and four HH prompts, with ``reward``."""

    def trigger(tmp: Path) -> object:
        from helpers import fit

        write_lines(tmp / "test.jsonl", good_lines(4))
        data = HHDataModule(
            data_path=str(tmp / "test.jsonl"),
            train_split="test",
            val_split=None,
            batch_size=2,
            max_length=24,
            max_prompt_length=16,
            shuffle=False,
        )
        module = PPOModule(model=TINY, reward=reward, sampling={"max_new_tokens": 2}, ppo_epochs=1)
        return fit(module, data, max_steps=1)

    return trigger


REWARDS = [
    Case(
        "reward-returns-strings",
        score_with(as_text),
        RewardError,
        r"reward 'as_text' returned str instead of a number at completions \[0, 1, 2\], e\.g\. 'good'",
    ),
    Case(
        "reward-wrong-count",
        score_with(one_score),
        RewardError,
        r"reward 'one_score' returned 1 scores for 3 completions",
    ),
    Case(
        "reward-nan",
        score_with(nan_for_short),
        RewardError,
        r"reward 'nan_for_short' returned non-finite scores: nan at completions \[2\] \(completion 2: 'meh'\); "
        r"the reward is at fault",
    ),
    Case(
        "reward-inf",
        score_with(infinite),
        RewardError,
        r"reward 'infinite' returned non-finite scores: inf at completions \[1\]",
    ),
    Case(
        "reward-scalar",
        score_with(scalar),
        RewardError,
        r"reward 'scalar' returned float 1\.0, not a list or tensor of 3 numbers \(one per completion\)",
    ),
    Case(
        "reward-matrix",
        score_with(matrix),
        RewardError,
        r"reward 'matrix' returned 6 scores for 3 completions \(a tensor of shape \(3, 2\)\)",
    ),
    Case(
        "reward-module-nan-names-class-and-dataset-rows",
        lambda tmp: BrokenSentiment()(["p"] * 3, COMPLETIONS, {"index": torch.tensor([4, 8, 15])}),
        RewardError,
        r"reward 'BrokenSentiment' returned non-finite scores: nan at completions \[0, 1, 2\] "
        r"\(dataset index \[4, 8, 15\]\)",
    ),
    Case(
        "grpo-reward-nan-not-none",
        grpo_scores(grpo_nan),
        RewardError,
        r"reward 'grpo_nan' returned non-finite scores: nan at completions \[2\] \(dataset index \[9\]\).*"
        r"return None for a completion the function does not apply to",
    ),
    Case(
        "ppo-reward-strings-before-the-loss",
        ppo_step_with(StringReward()),
        RewardError,
        r"reward 'StringReward' returned str instead of a number at completions \[0, 1\]",
    ),
    Case(
        "shared-check-none-outside-grpo",
        lambda tmp: check_reward_scores([1.0, None], length_reward, ["a", "b"]),
        RewardError,
        r"reward 'length_reward' returned NoneType instead of a number at completions \[1\]",
    ),
]


# ---- runs and checkpoints: fail at the start, never succeed at nothing -----------------------------------------


def fit_tiny(tmp: Path, **trainer) -> object:
    """One SFT fit of tiny-llama on four HH pairs (``export_dir``, ``max_steps``... as given)."""
    from helpers import fit

    write_lines(tmp / "test.jsonl", good_lines(4))
    data = HHDataModule(
        data_path=str(tmp / "test.jsonl"), train_split="test", val_split=None, batch_size=2, max_length=32,
        max_prompt_length=16,
    )  # fmt: skip
    export = trainer.pop("export_dir", str(tmp / "export"))
    return fit(SFTModule(model=TINY, export_dir=export), data, **trainer)


def export_dir_not_writable(tmp: Path) -> object:
    (tmp / "taken").write_text("a file where the export folder would go")  # not creatable, even as root
    return fit_tiny(tmp, max_steps=1, export_dir=str(tmp / "taken" / "model"))


def cli_fit(tmp: Path, module: str, ckpt_path: Path) -> None:
    """``lit-align fit`` of ``module`` on tiny-llama and four HH pairs, resuming from ``ckpt_path``."""
    from lit_align.cli import main

    write_lines(tmp / "test.jsonl", good_lines(4))
    main(
        [
            "fit",
            f"--model={module}",
            f"--model.model={TINY}",
            "--data=datamodules.HHDataModule",
            f"--data.data_path={tmp / 'test.jsonl'}",
            "--data.train_split=test",
            "--data.val_split=null",
            "--trainer.max_steps=1",
            "--trainer.logger=false",
            f"--ckpt_path={ckpt_path}",
        ]
    )


def truncated_checkpoint(tmp: Path) -> None:
    (tmp / "last.ckpt").write_bytes(b"PK\x03\x04 the rest of the copy never arrived")
    cli_fit(tmp, "lit_align.SFTModule", tmp / "last.ckpt")


def ckpt_of_another_module(tmp: Path) -> None:
    checkpoint = {"state_dict": {}, "hyper_parameters": {"_class_path": "lit_align.DPOModule", "model": TINY}}
    torch.save(checkpoint, tmp / "dpo.ckpt")
    cli_fit(tmp, "lit_align.KTOModule", tmp / "dpo.ckpt")


RUNS = [
    Case(
        "zero-optimizer-steps",
        lambda tmp: fit_tiny(tmp, max_steps=0),
        UserWarning,
        r"SFTModule: this fit made no optimizer step \(global step 0, max_steps 0, .*Nothing is exported",
    ),
    Case(
        "export-dir-not-writable",
        export_dir_not_writable,
        ValueError,
        r"export_dir='.*taken/model' cannot be created: Not a directory",
    ),
    # the CLI exits 2 with ``lit-align: error: ...`` on stderr (matched there)
    Case(
        "ckpt-path-missing",
        lambda tmp: cli_fit(tmp, "lit_align.SFTModule", tmp / "lsat.ckpt"),
        SystemExit,
        r"lit-align: error: --ckpt_path .*lsat\.ckpt: no such checkpoint file",
    ),
    Case(
        "ckpt-path-truncated",
        truncated_checkpoint,
        SystemExit,
        r"lit-align: error: --ckpt_path .*last\.ckpt: not a readable checkpoint \(truncated",
    ),
    Case(
        "ckpt-path-of-another-module",
        ckpt_of_another_module,
        SystemExit,
        r"--ckpt_path .*dpo\.ckpt is a lit_align\.DPOModule checkpoint; the command line trains lit_align\.KTOModule",
    ),
]


CASES = [
    *MODEL_IDS,
    *MODULE_ARGUMENTS,
    *PPO_ARGUMENTS_TODO,
    *CALLBACKS,
    *DATAMODULE_ARGUMENTS,
    *DATA_FILES,
    *REWARDS,
    *RUNS,
]


def _case(entry) -> Case:
    return entry.values[0] if hasattr(entry, "values") else entry


@pytest.mark.parametrize("case", [pytest.param(_case(c), marks=getattr(c, "marks", ()), id=_case(c).id) for c in CASES])
def test_bad_input_gets_its_message(case: Case, tmp_path: Path, capsys, monkeypatch) -> None:
    """The trigger raises ``expected`` with a message matching the regex (or warns with it; or, for the CLI, exits
    with it on stderr)."""
    if issubclass(case.expected, Warning):
        with pytest.warns(case.expected, match=case.message):
            case.trigger(tmp_path)
    elif case.expected is SystemExit:
        monkeypatch.setattr("sys.argv", ["lit-align"])  # pytest's own arguments are not the CLI's
        with pytest.raises(SystemExit) as exited:
            case.trigger(tmp_path)
        stderr = capsys.readouterr().err
        assert exited.value.code != 0
        assert re.search(case.message, stderr), stderr
    else:
        with pytest.raises(case.expected, match=case.message):
            case.trigger(tmp_path)


def test_the_table_is_large_and_its_ids_unique() -> None:
    ids = [_case(c).id for c in CASES]
    assert len(ids) >= 40
    assert len(set(ids)) == len(ids), sorted(i for i in ids if ids.count(i) > 1)
