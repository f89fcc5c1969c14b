"""``AlignmentCallback``: the protocol between lit-align's callbacks and ``lit_align.AlignmentModule``.

Lightning's ``Callback`` hooks cover most of what an alignment-tax control needs; two are missing, and
``AlignmentModule`` calls them itself (``AlignmentModule.call_callbacks``):

* ``on_configure_model(trainer, module)`` — once the models exist (after FSDP2 sharding) and before a checkpoint
  is restored into them: where a callback allocates the weight snapshots it keeps
  (``module.callback_weight_store``), so a restore fills them;
* ``on_after_optimizer_step(trainer, module)`` — after every optimizer step, PPO's manual ones included (Lightning
  has ``on_before_optimizer_step`` only).

A callback that rewrites the reference weights (a soup, a sync, Elastic Reset's EMA as reference) says so with
``writes_reference``: other callbacks then stop treating the reference as the initial policy. The module exposes what
callbacks need as properties and methods (``trainable_named_parameters``, ``policy_tensor_name``,
``reference_logps_precomputed``, ``callback_weight_store``); callbacks never read its hyperparameters.

A plain ``LightningModule`` never calls the two hooks, so an ``AlignmentCallback`` refuses one at ``setup`` instead
of silently doing nothing.
"""

from __future__ import annotations

import lightning as L

from lit_align.base import AlignmentModule


class AlignmentCallback(L.Callback):
    """Base class of lit-align's callbacks: the two extra hooks, ``writes_reference``, and the module check."""

    @property
    def writes_reference(self) -> bool:
        """Whether this callback overwrites the reference model's weights (default: no)."""
        return False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, AlignmentModule):
            raise TypeError(
                f"{type(self).__name__} works with lit-align modules (lit_align.AlignmentModule subclasses such as "
                f"DPOModule or PPOModule), which call its hooks; got {type(pl_module).__name__}, on which it would "
                "silently do nothing"
            )

    def on_configure_model(self, trainer: L.Trainer, pl_module: AlignmentModule) -> None:
        """The models exist (sharded under FSDP2) and no checkpoint has been restored yet: allocate snapshots."""

    def on_after_optimizer_step(self, trainer: L.Trainer, pl_module: AlignmentModule) -> None:
        """Called after every optimizer step, with the updated weights."""
