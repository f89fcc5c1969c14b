"""Strategy pieces for running on many devices with Lightning's own strategies (no home-made distribution).

* :class:`FSDP2Strategy` — Lightning's ``ModelParallelStrategy`` with every process in one data-parallel (FSDP2)
  group, so a config need not know the device count; ``AlignmentModule.configure_model`` does the sharding.
* :class:`DecoderLayerWrapPolicy` — an FSDP1 ``auto_wrap_policy`` (Lightning's ``FSDPStrategy``) that gives each
  decoder layer its own FSDP unit.
* FSDP2 mechanics every module shares: :func:`fully_shard_models` (per decoder layer, then the root),
  :func:`gathered_weights` (one all-gather per ``generate`` call), :func:`reshard` and :func:`full_state_dict`.

Configs: ``configs/strategies/{ddp,fsdp,fsdp2}.yaml``, stacked onto any benchmark config.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from lit_align.models import decoder_layers


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all ``num_nodes × devices`` processes (``data_parallel_size`` = world size, no tensor parallel).

    ``ModelParallelStrategy(data_parallel_size="auto")`` means one data-parallel replica per *node*; this sets it
    to the world size when the processes are known, which is plain FSDP.

    Args:
        save_distributed_checkpoint: sharded checkpoints (a directory, one file per rank) instead of one full file.
        process_group_backend: ``None`` picks nccl on GPU and gloo on CPU.
        timeout: collective timeout.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


class DecoderLayerWrapPolicy:
    """FSDP1 ``auto_wrap_policy`` that wraps each decoder layer in its own FSDP unit (the rest goes to the root).

    ``layer_classes`` are class *names* (``["LlamaDecoderLayer"]``), so a YAML config can name them without
    importing; ``None`` wraps every class that a transformers model inside the wrapped root lists in
    ``_no_split_modules`` (its decoder layer), found on the first call, which FSDP makes with the root. Used as
    ``FSDPStrategy(auto_wrap_policy=DecoderLayerWrapPolicy())`` (``configs/strategies/fsdp.yaml``).
    """

    def __init__(self, layer_classes: list[str] | None = None) -> None:
        self.layer_classes = set(layer_classes or [])

    def __call__(self, module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if recurse:
            if not self.layer_classes:
                self.layers_of(module)
            return True  # keep descending: the decision is per module
        return type(module).__name__ in self.layer_classes

    def layers_of(self, root: torch.nn.Module) -> set[str]:
        """The decoder layer class names of every transformers model inside ``root`` (also remembered)."""
        for module in root.modules():
            self.layer_classes.update(getattr(module, "_no_split_modules", None) or [])
        return self.layer_classes


def fully_shard_models(models: Iterable[nn.Module | None], mesh: DeviceMesh) -> None:
    """FSDP2: shard each decoder layer (the classes a transformers model lists in ``_no_split_modules``), then the
    root, over the data-parallel dimension of ``mesh``. Idempotent: models already sharded are skipped."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names:
        mesh = mesh["data_parallel"]
    for model in models:
        if model is None or isinstance(model, FSDPModule):
            continue
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)


@contextmanager
def gathered_weights(model: nn.Module) -> Iterator[None]:
    """Keep an FSDP2 model unsharded between forward calls inside the block, then reshard it (no-op unsharded)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.set_reshard_after_forward(False)  # recurses: the first forward gathers each layer, later ones reuse
    try:
        yield
    finally:
        reshard(model)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # the root stays unsharded after forward (FSDP2's own default: backward needs it right away)
                module.set_reshard_after_forward(module is not model, recurse=False)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict of an FSDP2 model, gathered to CPU on every rank (a collective: all ranks call it);
    None for an unsharded model, whose own ``state_dict`` is already whole."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def reshard(model: nn.Module) -> None:
    """Free the gathered weights of every FSDP2 unit in ``model`` so its parameters are the sharded DTensors again.

    FSDP2 keeps the root unit unsharded after a forward without backward (e.g. a no-grad scoring pass); weight
    arithmetic between two models (``copy_``) needs both in the same, sharded, form. No-op without FSDP2.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
