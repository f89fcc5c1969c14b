"""TRLFormatDataModule: each of TRL's dataset formats, standard and conversational, from a local file written here,
trains the modules that use it for a few steps on tiny-llama; chat templates give completion masks that cover
exactly the assistant turn."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import datasets
import pytest
from helpers import fit

from datamodules import TRLFormatDataModule
from datamodules.keys import COMPLETION_MASK, INPUT_IDS
from datamodules.readers import DataValidationError
from lit_align import DPOModule, GRPOModule, KTOModule, SFTModule
from lit_align.cli import TRAINER_DEFAULTS_FILE, run_cli
from lit_align.models import load_tokenizer, tiny_llama

REPO = Path(__file__).resolve().parents[1]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


QUESTIONS = [f"What is {a} plus {b}?" for a in range(4) for b in range(2)]
STANDARD = {
    "text": [{"text": f"{q} It is a number."} for q in QUESTIONS],
    "prompt-only": [{"prompt": q} for q in QUESTIONS],
    "prompt-completion": [{"prompt": q, "completion": " It is small."} for q in QUESTIONS],
    "preference": [{"prompt": q, "chosen": " Small.", "rejected": " Large."} for q in QUESTIONS],
    "implicit": [{"chosen": f"{q} Small.", "rejected": f"{q} Large."} for q in QUESTIONS],
    "unpaired": [{"prompt": q, "completion": " Small.", "label": i % 2 == 0} for i, q in enumerate(QUESTIONS)],
}
CONVERSATIONAL = {
    "text": [{"messages": user(q) + assistant("A number.")} for q in QUESTIONS],
    "prompt-only": [{"prompt": user(q)} for q in QUESTIONS],
    "prompt-completion": [{"prompt": user(q), "completion": assistant("Small.")} for q in QUESTIONS],
    "preference": [
        {"prompt": user(q), "chosen": assistant("Small."), "rejected": assistant("Big.")} for q in QUESTIONS
    ],
    "implicit": [{"chosen": user(q) + assistant("Small."), "rejected": user(q) + assistant("Big.")} for q in QUESTIONS],
    "unpaired": [
        {"prompt": user(q), "completion": assistant("Small."), "label": i % 2 == 0} for i, q in enumerate(QUESTIONS)
    ],
}
FORMAT_NAMES = {
    "text": "language modelling",
    "prompt-only": "prompt-only",
    "prompt-completion": "prompt-completion",
    "preference": "preference (explicit prompt)",
    "implicit": "preference (implicit prompt)",
    "unpaired": "unpaired preference",
}


def completion_length(prompts, completions, **columns) -> list[float]:
    """A TRL-style reward: conversational completions come as ``[{"role": "assistant", "content": ...}]``."""
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]


MODULES = {  # format → the module trained on it
    "text": lambda: SFTModule(model="tiny-llama", learning_rate=1e-3),
    "prompt-completion": lambda: SFTModule(model="tiny-llama", learning_rate=1e-3),
    "preference": lambda: DPOModule(model="tiny-llama", learning_rate=1e-3),
    "implicit": lambda: KTOModule(model="tiny-llama", learning_rate=1e-3),  # pairs → unpaired rows
    "unpaired": lambda: KTOModule(model="tiny-llama", learning_rate=1e-3),
    "prompt-only": lambda: GRPOModule(
        model="tiny-llama",
        reward_funcs=[completion_length],
        num_generations=2,
        sampling={"max_new_tokens": 4},
        learning_rate=1e-3,
    ),  # fmt: skip
}


def write(tmp_path, rows: list[dict], name: str = "train.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


@pytest.mark.parametrize("style", ["standard", "conversational"])
@pytest.mark.parametrize("data_format", sorted(MODULES))
def test_each_format_trains_its_module(tmp_path, style, data_format):
    rows = (STANDARD if style == "standard" else CONVERSATIONAL)[data_format]
    data = TRLFormatDataModule(str(write(tmp_path, rows)), batch_size=4, max_length=64, max_prompt_length=48)
    module = MODULES[data_format]()
    trainer = fit(module, data, max_steps=2 * module.optimizer_steps_per_batch())
    assert trainer.global_step == 2 * module.optimizer_steps_per_batch()
    initial = tiny_llama(0).state_dict()
    trained = module.policy.state_dict()
    assert max(float((trained[k] - v).abs().max()) for k, v in initial.items()) > 0  # the policy trained
    assert data.format == FORMAT_NAMES[data_format]


def test_the_completion_mask_covers_exactly_the_assistant_turn_of_the_chat_template(tmp_path):
    tokenizer = load_tokenizer("tiny-llama")  # SmolLM2's tokenizer and chat template
    rows = [{"prompt": user("Hi there"), "completion": assistant("Hello, friend.")}]
    data = TRLFormatDataModule(str(write(tmp_path, rows)), batch_size=1).attach(tokenizer, "text")
    batch = next(iter(data.dataloader("train")))
    ids, mask = batch[INPUT_IDS][0], batch[COMPLETION_MASK][0].bool()
    full = tokenizer.apply_chat_template(user("Hi there") + assistant("Hello, friend."), tokenize=False)
    prompt = tokenizer.apply_chat_template(user("Hi there"), tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids[mask]) == full[len(prompt) :].rstrip("\n")  # the answer and its end-of-turn token
    assert tokenizer.decode(ids[mask]).endswith(tokenizer.eos_token) and "Hello, friend." in tokenizer.decode(ids[mask])
    assert tokenizer.decode(ids[~mask & batch["attention_mask"][0].bool()]) == prompt


def test_implicit_prompts_are_the_shared_start():
    split = TRLFormatDataModule.implicit_prompt("Q: two? A: 2", "Q: two? A: 3", "row 1")
    assert split == {"prompt": "Q: two? A:", "chosen": " 2", "rejected": " 3"}
    turns = TRLFormatDataModule.implicit_prompt(user("q") + assistant("a"), user("q") + assistant("b"), "row 1")
    assert turns == {"prompt": user("q"), "chosen": assistant("a"), "rejected": assistant("b")}


def test_column_mapping_and_bad_rows(tmp_path):
    tokenizer = load_tokenizer("tiny-llama")
    rows = [{"question": "q?", "response_j": " yes", "response_k": " no"}]
    mapped = TRLFormatDataModule(
        str(write(tmp_path, rows)), columns={"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    ).attach(tokenizer, "pair")
    assert mapped.dataset("train").records[0] == {"prompt": "q?", "chosen": " yes", "rejected": " no"}
    cases = {
        "unknown columns": ([{"question": "q", "answer": "a"}], r"row 1: columns \['answer', 'question'\] match none"),
        "mixed formats": ([{"prompt": "a"}, {"prompt": "b", "completion": "c"}], "row 2: a prompt-completion row in"),
        "label not a bool": ([{"prompt": "a", "completion": "b", "label": "yes"}], "field 'label': expected a bool"),
        "system prompt on strings": ([{"prompt": "a", "completion": "b"}], "row 1: system_prompt is set but the rows"),
        "chosen not text": (
            [{"prompt": "q", "chosen": 42, "rejected": "no"}],
            "row 1: fields 'prompt' and 'chosen' must both be strings or both lists of messages, got str and int",
        ),
        "bad message in an implicit pair": (  # named where it is in the row, not in the split-off completion
            [{"chosen": user("q") + [{"role": "assistant", "text": "a"}], "rejected": user("q") + assistant("b")}],
            r"row 1: field 'chosen\[1\]': expected \{role, content\}",
        ),
        "a column by a batch name": ([{"prompt": "q", "completions": "x"}], "row 1: column 'completions' has a name"),
    }
    for name, (bad_rows, message) in cases.items():
        path = str(write(tmp_path, bad_rows, f"{name}.jsonl"))
        system = "Be brief." if name == "system prompt on strings" else None
        data = TRLFormatDataModule(path, system_prompt=system).attach(tokenizer, "text")
        with pytest.raises(DataValidationError, match=message):
            data.dataset("train")


def test_empty_and_missing_splits_get_one_line_messages(tmp_path):
    tokenizer = load_tokenizer("tiny-llama")
    (tmp_path / "empty.csv").write_text("prompt,chosen,rejected\n", encoding="utf-8")
    (tmp_path / "splits").mkdir()
    write(tmp_path / "splits", [{"prompt": "a", "chosen": " b", "rejected": " c"}], "train.jsonl")
    one_split = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "a"}])})
    cases = {
        "empty csv": (dict(data_path=str(tmp_path / "empty.csv")), r"empty\.csv: split 'train' is empty \(0 rows\)"),
        "empty Dataset": (
            dict(data_path=datasets.Dataset.from_dict({"prompt": []})),
            r"split 'train' of the in-memory dataset is empty \(0 rows\)",
        ),
        "no such file split": (
            dict(data_path=str(tmp_path / "splits"), val_split="valid"),
            r"no valid\.jsonl\(\.gz\)/\.json/\.parquet/\.csv for split 'valid' \(found: \['train\.jsonl'\]\)",
        ),
        "no such DatasetDict split": (
            dict(data_path=one_split, val_split="test"),
            r"the DatasetDict has no split 'test' \(splits: \['train'\]\)",
        ),
    }
    for name, (kwargs, message) in cases.items():
        with pytest.raises((DataValidationError, ValueError, FileNotFoundError), match=message) as raised:
            TRLFormatDataModule(**kwargs).attach(tokenizer, "pair").setup("fit")
        assert "\n" not in str(raised.value), name


README_FILES = {  # the file names of the README's "Your own data" commands → rows of that format
    "my_text.jsonl": lambda i: {"messages": user(f"Say {i}.") + assistant(f"{i}.")},
    "my_completions.jsonl": lambda i: {"prompt": f"Count: {i},", "completion": f" {i + 1}."},
    "my_prompts.jsonl": lambda i: {"prompt": f"Write a happy review of film number {i}:"},
    "my_pairs.jsonl": lambda i: {"prompt": f"{i} plus one is", "chosen": f" {i + 1}.", "rejected": f" {i + 2}."},
    "my_implicit_pairs.jsonl": lambda i: {"chosen": f"{i} plus one is {i + 1}.", "rejected": f"{i} plus one is {i}."},
    "my_labels.jsonl": lambda i: {"prompt": f"{i} plus one is", "completion": f" {i + i % 2}.", "label": i % 2 == 1},
    "my_stack.jsonl": lambda i: {"question": f"What is {i} + 1?", "response_j": f" {i + 1}", "response_k": " 7"},
    "my_chat_pairs.jsonl": lambda i: {
        "prompt": user(f"What is {i} + 1?"),
        "chosen": assistant(f"{i + 1}"),
        "rejected": assistant("7"),
    },
}


def run_cli_in_process(args: list[str]):
    return run_cli([str(TRAINER_DEFAULTS_FILE)], args)


def readme_commands() -> list[list[str]]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    return [shlex.split(line)[1:] for line in section.splitlines() if line.startswith("lit-align fit")]


def test_the_readme_commands_for_each_format_train(tmp_path, monkeypatch):
    """Each `lit-align fit` line of the README's "Your own data" section, run as written on a 120-row file of its
    format, with the tiny model and one step; the formats recognised are the ones the README names."""
    monkeypatch.setattr(sys, "argv", ["lit-align"])
    commands = readme_commands()
    assert {next(a for a in c if a.endswith(".jsonl")) for c in commands} == set(README_FILES)
    recognised, prompts = [], {}
    for args in commands:
        name = next(a for a in args if a.endswith(".jsonl"))
        write(tmp_path, [README_FILES[name](i) for i in range(120)], name)
        args = [str(REPO / a) if a.startswith("configs/") else a for a in args]
        overrides = ["--model.init_args.model", "tiny-llama", "--trainer.max_steps", "1"]
        overrides += ["--trainer.limit_val_batches", "0"]
        if "grpo" in " ".join(args):
            overrides += ["--model.init_args.sampling", "{max_new_tokens: 4}", "--model.init_args.drift_texts", "0"]
        cli = run_cli_in_process([*args, *overrides])
        assert cli.trainer.global_step == 1, name
        recognised.append(cli.datamodule.format)
        prompts[name] = cli.datamodule.dataset("train").records[0]["prompt"]
    assert recognised == [
        "language modelling",
        "prompt-completion",
        "prompt-only",
        "preference (explicit prompt)",
        "preference (implicit prompt)",
        "unpaired preference",
        "preference (explicit prompt)",
        "preference (explicit prompt)",
    ]
    chat = prompts["my_chat_pairs.jsonl"]
    assert chat.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>"), chat


PROBE_REWARDS = """
import json, os

def solved(prompts, completions, solution, completion_ids, **columns):
    with open(os.environ["PROBE_OUT"], "a") as out:
        out.write(json.dumps({"prompts": prompts, "completions": completions, "solution": solution,
                              "others": sorted(columns)}) + "\\n")
    return [float(solution[i] in completion[0]["content"]) for i, completion in enumerate(completions)]
"""


def test_grpo_reward_functions_get_your_columns_and_messages_as_trl_passes_them(tmp_path):
    """A TRL-style reward function in a file of the working directory, named by import path on the `lit-align`
    command line, gets the conversational prompts as messages, each completion as one assistant message, and the
    data's own `solution` column aligned with its completion (TRL's GRPOTrainer contract)."""
    import subprocess

    (tmp_path / "probe_rewards.py").write_text(PROBE_REWARDS)
    rows = [{"prompt": user(q), "solution": str(sum(int(w) for w in q[:-1].split() if w.isdigit()))} for q in QUESTIONS]
    write(tmp_path, rows, "sums.jsonl")
    command = [
        "lit-align", "fit", "--config", str(REPO / "configs/imdb/grpo.yaml"),
        "--data", "datamodules.TRLFormatDataModule", "--data.init_args.data_path", "sums.jsonl",
        "--data.init_args.holdout", "2", "--data.init_args.batch_size", "2",
        "--model.init_args.model", "tiny-llama", "--model.init_args.reward_funcs", "[probe_rewards.solved]",
        "--model.init_args.num_generations", "2", "--model.init_args.sampling", "{max_new_tokens: 4}",
        "--model.init_args.drift_texts", "0", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--trainer.precision", "32-true",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PROBE_OUT": str(tmp_path / "probe.jsonl")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    calls = [json.loads(line) for line in (tmp_path / "probe.jsonl").read_text().splitlines()]
    assert len(calls) == 2  # one rollout per step
    for call in calls:
        assert len(call["prompts"]) == len(call["completions"]) == len(call["solution"]) == 4  # 2 prompts × G = 2
        assert call["others"] == []
        for prompt, completion, solution in zip(call["prompts"], call["completions"], call["solution"], strict=True):
            assert prompt == user(prompt[-1]["content"])  # the row's messages (no system prompt was set)
            a, b = (int(w) for w in prompt[-1]["content"][:-1].split() if w.isdigit())
            assert solution == str(a + b)  # this completion's own row's column
            assert len(completion) == 1 and completion[0]["role"] == "assistant"
            assert isinstance(completion[0]["content"], str)
        assert call["prompts"][0] == call["prompts"][1] != call["prompts"][2]  # a group's G samples share the prompt


def test_bad_data_on_the_command_line_is_one_line_naming_file_row_and_field(tmp_path):
    import subprocess

    rows = [{"prompt": "q", "chosen": " yes", "rejected": " no"}, {"prompt": "q", "chosen": " yes"}]
    path = write(tmp_path, rows, "pairs.jsonl")
    command = [
        "lit-align", "fit", "--config", str(REPO / "configs/hh/dpo.yaml"), "--data", "datamodules.TRLFormatDataModule",
        "--data.init_args.data_path", str(path), "--data.init_args.holdout", "0",
        "--model.init_args.model", "tiny-llama",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lit-align: error: {path}") and last.endswith("row 2: field 'rejected': missing (null)")
