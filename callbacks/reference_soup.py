"""Reference soup (SALSA, Chegini et al. 2024, arXiv 2411.01798): the KL reference is a weight-space average of
N fine-tuned checkpoints of one base model instead of a single SFT model.

    θ_ref = Σ_i w_i·θ_i,   Σ_i w_i = 1   (the paper: two SFT runs, equal weights)

Checkpoints are Hugging Face directories (``save_pretrained``) or Lightning ``.ckpt`` files of a lit-align module
(the ``policy.`` tensors are taken). ``init_policy`` starts the policy from the soup too (our reading of the
paper; the abstract does not say). Works with PPO, DPO and KTO alike: they all read ``module.reference``.

``lit-align soup A B [--weights 0.5 0.5] --out DIR`` (:func:`save_soup`) writes the same average as a Hugging Face
directory, to evaluate the soup itself or to use it as ``lit-align evaluate``'s reference.

Extra copies of the weights: none kept. While the soup is built, one loaded checkpoint plus the running sum
(float64) are in memory; under FSDP2 each rank then keeps only its shard, written into the reference.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from callbacks.base import AlignmentCallback
from callbacks.weights import average_state_dicts, local, reference_pairs, shard_like
from lit_align.base import AlignmentModule


def load_state_dict(source: str | Path) -> dict[str, Tensor]:
    """The model tensors of an HF directory or a lit-align Lightning checkpoint, names as in the HF model."""
    path = Path(source)
    if path.is_dir():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).state_dict()
    if path.is_file():
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        state = checkpoint.get("state_dict", checkpoint)
        names = {name: AlignmentModule.policy_tensor_name(name) for name in state}
        policy = {own: state[name] for name, own in names.items() if own is not None}
        if not policy:
            prefix = AlignmentModule.policy_prefix
            raise ValueError(f"{path}: no '{prefix}' tensors in its state_dict; is it a lit-align checkpoint?")
        return policy
    raise FileNotFoundError(f"ReferenceSoup: checkpoint {path} does not exist")


class ReferenceSoup(AlignmentCallback):
    """Replace the reference (and optionally the initial policy) by the weighted average of checkpoints.

    Args:
        checkpoints: HF model directories or Lightning ``.ckpt`` files, all of the reference's architecture.
        weights: one weight per checkpoint, summing to 1 (default: equal weights).
        init_policy: start the policy from the soup as well.
    """

    def __init__(self, checkpoints: list[str], weights: list[float] | None = None, init_policy: bool = False) -> None:
        if len(checkpoints) < 1:
            raise ValueError("ReferenceSoup: give at least one checkpoint")
        weights = list(weights) if weights is not None else [1.0 / len(checkpoints)] * len(checkpoints)
        if len(weights) != len(checkpoints):
            raise ValueError(f"ReferenceSoup: {len(weights)} weights for {len(checkpoints)} checkpoints")
        if abs(sum(weights) - 1.0) > 1e-6 or min(weights) < 0:
            raise ValueError(f"ReferenceSoup: weights must be non-negative and sum to 1, got {weights}")
        self.checkpoints, self.weights, self.init_policy = [str(c) for c in checkpoints], weights, init_policy
        self.applied = False

    writes_reference = True

    @property
    def state_key(self) -> str:
        return self._generate_state_key(checkpoints=self.checkpoints, weights=self.weights)

    def soup(self) -> dict[str, Tensor]:
        def loaded() -> Iterator[tuple[str, Mapping[str, Tensor]]]:
            for checkpoint in self.checkpoints:
                yield checkpoint, load_state_dict(checkpoint)

        return average_state_dicts(loaded(), self.weights)

    @torch.no_grad()
    def on_configure_model(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.applied:
            return
        pairs = reference_pairs(pl_module, "ReferenceSoup")
        soup = self.soup()
        for name, policy, reference in pairs:
            if name not in soup:
                raise ValueError(f"ReferenceSoup: {self.checkpoints[0]} has no tensor '{name}' of the reference")
            if soup[name].shape != reference.shape:
                raise ValueError(
                    f"ReferenceSoup: tensor '{name}' is {tuple(soup[name].shape)} in {self.checkpoints[0]} but "
                    f"{tuple(reference.shape)} in the reference model"
                )
            part = shard_like(soup[name], reference)
            local(reference).copy_(part)
            if self.init_policy:
                local(policy).copy_(part)
        self.applied = True
        rank_zero_info(
            f"ReferenceSoup: reference{' and policy' if self.init_policy else ''} = "
            + " + ".join(f"{w:g}·{c}" for w, c in zip(self.weights, self.checkpoints, strict=True))
        )


def soup_model(checkpoints: list[str], weights: list[float] | None = None, architecture: str | None = None):
    """A causal LM (float32) holding Σ_i w_i·θ_i of ``checkpoints``.

    ``architecture``: the model (directory, Hub id or lit-align alias) whose config the soup takes; default the
    first checkpoint, which must then be a directory. Weights are checked as ``ReferenceSoup``'s."""
    from lit_align.models import load_causal_lm

    soup = ReferenceSoup(checkpoints, weights)
    architecture = architecture or soup.checkpoints[0]
    if architecture.endswith(".ckpt"):
        raise ValueError(f"soup: {architecture} is a Lightning checkpoint; give the architecture (a model)")
    model = load_causal_lm(architecture)
    tensors = soup.soup()
    expected = set(model.state_dict())
    if missing := sorted(expected - set(tensors)):
        raise ValueError(f"soup: the checkpoints lack {len(missing)} tensors of {architecture}, {missing[:3]}")
    model.load_state_dict({name: tensors[name].float() for name in expected})
    return model


def save_soup(
    checkpoints: list[str], out: str | Path, weights: list[float] | None = None, architecture: str | None = None
) -> Path:
    """Write :func:`soup_model` to ``out`` as a Hugging Face directory (weights, config, the architecture's
    tokenizer), with ``soup.json`` naming the checkpoints and weights."""
    from lit_align.models import load_tokenizer

    model = soup_model(checkpoints, weights, architecture)
    out = Path(out)
    model.save_pretrained(out)
    load_tokenizer(architecture or str(checkpoints[0])).save_pretrained(out)
    checked = ReferenceSoup(checkpoints, weights)  # its checkpoint names and (default equal) weights
    record = {"checkpoints": checked.checkpoints, "weights": checked.weights}
    (out / "soup.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return out


def main(args: list[str] | None = None) -> None:
    """``lit-align soup CHECKPOINT CHECKPOINT ... [--weights W W ...] --out DIR [--architecture MODEL]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="lit-align soup", description=main.__doc__)
    parser.add_argument("checkpoints", nargs="+", help="HF model directories or lit-align .ckpt files")
    parser.add_argument("--weights", type=float, nargs="+", default=None, help="one per checkpoint (default equal)")
    parser.add_argument("--out", required=True, help="the directory to write")
    parser.add_argument("--architecture", default=None, help="config and tokenizer (default: the first checkpoint)")
    options = parser.parse_args(args)
    path = save_soup(options.checkpoints, options.out, options.weights, options.architecture)
    print(f"lit-align soup: wrote {path}")
