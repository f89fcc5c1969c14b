"""Exported policies that explain themselves, and ``lit-align export`` (any checkpoint → a Hugging Face directory).

Every export writes, next to the weights and tokenizer:

* ``README.md``, a model card: base model, method and its paper, training data, final metrics, the resolved config;
* ``lit_align.json``, what evaluation needs to know: the base model and the reference the policy was trained
  against. ``AlignmentModule`` reads it when a policy directory is loaded without ``reference_model``, so validating
  an exported policy compares it with its real reference instead of with itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

MODEL_CARD = "README.md"
METADATA = "lit_align.json"


def read_metadata(model_source: str) -> dict[str, Any] | None:
    """``lit_align.json`` of a local model directory exported by lit-align; None for anything else."""
    path = Path(model_source).expanduser() / METADATA
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def plain(value: Any) -> Any:
    """``value`` as YAML/JSON data: containers recursively, objects by their repr."""
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def write_model_card(directory: Path, module: Any, metrics: Mapping[str, float], data: Any | None) -> None:
    """Write ``README.md`` and ``lit_align.json`` into the export ``directory`` of ``module``; ``data`` is the
    DataModule of the fit, or the datamodule hyperparameters of the checkpoint it was rebuilt from."""
    hparams = plain(dict(module.hparams))
    class_path = f"{type(module).__module__.split('.')[0]}.{type(module).__qualname__}"
    base_model = hparams.get("model")
    reference = hparams.get("reference_model") or base_model
    step = int(module.trainer.global_step) if module._trainer is not None else module.checkpoint_global_step
    metadata = {
        "base_model": base_model,
        "reference_model": reference,
        "method": class_path,
        "paper": type(module).paper,
        "global_step": step,
        "lora": hparams.get("lora"),
    }
    (directory / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    data_lines = ["not recorded (the policy was exported outside a fit)"]
    if isinstance(data, Mapping):  # a checkpoint's datamodule hyperparameters
        data_lines = [f"{name}: `{value}`" for name, value in plain(data).items() if not name.startswith("_")]
    elif data is not None:
        data_lines = [f"`{type(data).__module__.split('.')[0]}.{type(data).__qualname__}`"]
        for name in ("data_path", "train_split", "val_split", "holdout", "limit_train", "max_length"):
            if hasattr(data, name):
                data_lines.append(f"{name}: `{getattr(data, name)}`")
    metric_rows = [f"| {name} | {value:.4g} |" for name, value in sorted(metrics.items())]
    card = [
        "---",
        yaml.safe_dump({"base_model": base_model, "library_name": "transformers", "tags": ["lit-align"]}).strip(),
        "---",
        f"# {Path(directory).name}",
        "",
        f"Trained with lit-align's `{class_path}` from `{base_model}`"
        + (f" for {step} optimizer steps." if step is not None else "."),
        "",
        "## Method",
        "",
        type(module).paper,
        "",
        f"Reference model (for KL, rewards and evaluation): `{reference}`.",
        "",
        "## Data",
        "",
        *[f"- {line}" for line in data_lines],
        "",
        "## Final metrics",
        "",
        *(["| metric | value |", "|---|---|", *metric_rows] if metric_rows else ["none logged"]),
        "",
        "## Config (the module's resolved arguments)",
        "",
        "```yaml",
        yaml.safe_dump(hparams, sort_keys=True).strip(),
        "```",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{directory}")',
        "```",
        "",
    ]
    (directory / MODEL_CARD).write_text("\n".join(card))


def logged_metrics(module: Any) -> dict[str, float]:
    """The trainer's latest scalar metrics (what the run logged last), as floats."""
    if module._trainer is None:
        return {}
    values = {}
    for name, value in module.trainer.callback_metrics.items():
        if torch.is_tensor(value) and value.numel() == 1:
            values[name] = float(value)
    return values


def export_checkpoint(ckpt_path: str | Path, export_dir: str | Path, merge: bool = True) -> Path:
    """Rebuild the module a lit-align checkpoint was saved from and export its policy to ``export_dir``.

    The class comes from the checkpoint; arguments from its hyperparameters (a checkpoint of the ``lit-align``
    CLI keeps the config, so rewards and targets given by class path are rebuilt too). Under LoRA ``merge=False``
    writes a peft adapter directory instead of merged weights.
    """
    import importlib

    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    hparams = checkpoint.get("hyper_parameters") or {}
    class_path = hparams.get("_class_path") or checkpoint.get("lit_align_module_class")
    if class_path is None:
        raise ValueError(f"{ckpt_path}: not a lit-align checkpoint (no module class recorded)")
    module_name, _, class_name = class_path.rpartition(".")
    module_class = getattr(importlib.import_module(module_name), class_name)
    module = module_class.load_from_checkpoint(ckpt_path, map_location="cpu")
    module.export(export_dir, merge=merge)
    return Path(export_dir)
