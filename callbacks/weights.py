"""The one place for weight snapshots that callbacks keep: select, copy, average, load back.

Plain tensors and FSDP2 shards alike: under FSDP2 every parameter is a DTensor holding this rank's shard. A
snapshot is a clone of that local shard, so elementwise math (EMA, interpolation, merging) runs shard by shard with
no communication and each rank stores only its part. Snapshots are buffers of a ``WeightStore`` submodule of the
LightningModule (``module.callback_weight_store(name, ...)``), so they travel through the module's checkpoint
(sharded under FSDP2); a callback's own ``state_dict`` is saved from rank 0 only and holds just counters and RNG
state. Snapshots are allocated in ``AlignmentCallback.on_configure_model`` (``callbacks/base.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from lit_align.base import AlignmentModule

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor, distribute_tensor = (), None


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a (possibly sharded) tensor, as a plain tensor that shares its storage."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: Tensor) -> Tensor:
    """The whole tensor (all-gathered under FSDP2)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(whole: Tensor, like: Tensor) -> Tensor:
    """The part of a full tensor that ``like`` (a parameter, maybe a DTensor shard) holds on this rank."""
    whole = whole.to(device=local(like).device, dtype=like.dtype)
    if isinstance(like, DTensor):  # every rank holds ``whole``: cut locally, no scatter
        return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local()
    return whole


def reference_pairs(module: AlignmentModule, owner: str) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(name, policy parameter, reference parameter) with the same name, for callbacks that write the reference."""
    if module.reference_logps_precomputed:
        raise ValueError(f"{owner} changes the reference, so its log-probs cannot be precomputed: precompute_ref_logps")
    if module.reference is None:
        reason = (
            "with LoRA the reference is the policy with adapters disabled"
            if module.uses_lora
            else "the module holds no reference model (reference-free loss, or reference log-probs precomputed)"
        )
        raise ValueError(f"{owner} writes the reference weights, but {reason}; use a full reference copy")
    references = dict(module.reference.named_parameters())
    pairs = []
    for name, parameter in module.policy.named_parameters():
        if name not in references or references[name].shape != parameter.shape:
            raise ValueError(f"{owner}: policy tensor '{name}' has no reference tensor of the same name and shape")
        pairs.append((name, parameter, references[name]))
    return pairs


def _buffer_name(name: str) -> str:
    return name.replace(".", "/")  # buffer names may not contain dots


class WeightStore(nn.Module):
    """Named snapshots kept as buffers, so the module's checkpoint carries them. Under FSDP2 each is a DTensor
    laid out like its parameter: a rank stores its shard only, and a sharded checkpoint saves every shard."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.names = list(tensors)
        for name, tensor in tensors.items():
            self.register_buffer(_buffer_name(name), tensor.detach().clone())

    def __getitem__(self, name: str) -> Tensor:
        """This rank's part of snapshot ``name`` (a plain tensor sharing the buffer's storage)."""
        return local(getattr(self, _buffer_name(name)))

    def whole(self, name: str) -> Tensor:
        """Snapshot ``name`` as stored (a DTensor under FSDP2)."""
        return getattr(self, _buffer_name(name))

    def items(self) -> Iterable[tuple[str, Tensor]]:
        return ((name, self[name]) for name in self.names)

    def numel(self) -> int:
        return sum(self[name].numel() for name in self.names)


def attach_store(module: AlignmentModule, name: str, tensors: Mapping[str, Tensor]) -> WeightStore:
    """The module's snapshot store ``name``, holding copies of ``tensors`` when it is first made."""
    return module.callback_weight_store(name, lambda: WeightStore(tensors))


def initial_weights(
    trainer, module: AlignmentModule, store_name: str, weights: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """θ_0 of ``weights`` (local shards). Where the frozen reference still holds a tensor's initial value and no
    callback rewrites the reference, that tensor is read from the reference: no copy. The rest (LoRA adapters, a
    value head, a reference from elsewhere) is snapshotted into the store ``store_name``."""
    shared: dict[str, Tensor] = {}
    rewritten = any(getattr(callback, "writes_reference", False) for callback in trainer.callbacks)
    if module.reference is not None and not rewritten and not module.reference_logps_precomputed:
        references = dict(module.reference.named_parameters())
        for name, parameter in weights.items():
            reference = references.get(module.policy_tensor_name(name) or name)
            if reference is not None and reference.shape == parameter.shape:
                if torch.equal(local(reference), local(parameter)):
                    shared[name] = local(reference)
    rest = {name: parameter for name, parameter in weights.items() if name not in shared}
    stored = dict(attach_store(module, store_name, rest).items()) if rest else {}
    return {name: shared.get(name, stored.get(name)) for name in weights}


@torch.no_grad()
def nonzero_anywhere(tensors: Iterable[Tensor]) -> list[bool]:
    """For each tensor (a local shard or a DTensor), whether any entry is non-zero on any rank: one collective for
    all of them when a process group is up (a shard may be empty or all-zero on one rank only)."""
    flags = [bool(local(tensor).any()) for tensor in tensors]
    if not flags or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flags
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    reduced = torch.tensor(flags, dtype=torch.int32, device=device)
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX)
    return [bool(flag) for flag in reduced.tolist()]


@torch.no_grad()
def ema_update_(average: Tensor, value: Tensor, decay: float) -> None:
    """average ← decay·average + (1 − decay)·value, in place."""
    average.lerp_(value.to(average.dtype), 1.0 - decay)


def interpolate(initial: Tensor, trained: Tensor, alpha: float) -> Tensor:
    """(1 − α)·θ_init + α·θ_trained (WiSE-FT, Wortsman et al. 2022, Eq. 1; α = 1 keeps the trained weights)."""
    return initial + alpha * (trained - initial)


_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Decoder-layer number in a parameter name (Llama ``layers.i``, GPT-2 ``h.i``), or None outside layers."""
    match = _LAYER_INDEX.search("." + name)
    return int(match.group(1)) if match else None


def average_state_dicts(state_dicts: Iterable[tuple[str, Mapping[str, Tensor]]], weights: list[float]) -> dict:
    """Σ_i w_i·θ_i over checkpoints with identical tensor names and shapes (a model soup, Wortsman et al. 2022).

    ``state_dicts`` yields ``(source, state_dict)`` one at a time so only one checkpoint and the running sum are in
    memory. The first tensor whose name or shape differs from the first checkpoint is a ``ValueError`` naming it.
    """
    total: dict[str, Tensor] = {}
    first_source = None
    for index, (source, state) in enumerate(state_dicts):
        weight = weights[index]
        if first_source is None:
            first_source = source
            total = {name: tensor.detach().double() * weight for name, tensor in state.items()}
            continue
        for name in total:
            if name not in state:
                raise ValueError(f"{source} has no tensor '{name}' (present in {first_source})")
            if state[name].shape != total[name].shape:
                raise ValueError(
                    f"{source}: tensor '{name}' has shape {tuple(state[name].shape)}, "
                    f"{first_source} has {tuple(total[name].shape)}"
                )
            total[name] += state[name].detach().double() * weight
        extra = sorted(set(state) - set(total))
        if extra:
            raise ValueError(f"{source} has tensor '{extra[0]}' that {first_source} does not have")
    return total
