"""`SparsityCallback` for PyTorch Lightning: the sparsity regularizer in a ``Trainer.fit``.

pip install 'compressor[lightning]'
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from ..pruning.planning import PruningPlan, module_for_plan
from ..pruning.regularizer import SparsityRegularizer


class SparsityCallback(pl.Callback):
    """Drive the channels of a pruning plan to zero during a Lightning ``fit``.

    The plan (`compressor.plan_pruning`) is made for the network the LightningModule trains
    (the module itself or one of its submodules, found by structure). Before every optimizer
    step (after Lightning unscales mixed-precision gradients and accumulates batches) the
    regularizer's L1 penalty adds its gradient; after it, the regularizer steps, so the
    planned channels reach zero at ``ramp`` of the fit's optimizer steps
    (``trainer.estimated_stepping_batches`` unless ``total_steps`` is given).

    Example:
        >>> plan = cz.plan_pruning(lit.model, example, ratio=0.5)          # doctest: +SKIP
        >>> trainer = L.Trainer(max_epochs=2, callbacks=[SparsityCallback(plan)])  # doctest: +SKIP
        >>> trainer.fit(lit, loader); pruned = cz.prune(lit.model, example, plan)  # doctest: +SKIP

    Args:
        plan: the pruning plan.
        ramp, l1: as `SparsityRegularizer`'s.
        total_steps: optimizer steps of the fit (default: Lightning's estimate).
    """

    def __init__(
        self,
        plan: PruningPlan,
        *,
        ramp: float = 0.25,
        l1: float = 1e-4,
        total_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.ramp = ramp
        self.l1 = l1
        self.total_steps = total_steps
        self.regularizer: SparsityRegularizer | None = None
        self._seen_step = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the regularizer on the planned network, for the fit's optimizer steps."""
        total = self.total_steps or int(trainer.estimated_stepping_batches)
        network = module_for_plan(pl_module, self.plan)
        self.regularizer = SparsityRegularizer(
            network, self.plan, total_steps=total, ramp=self.ramp, l1=self.l1
        )
        self._seen_step = trainer.global_step

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        """Add the L1 penalty's gradient to the (unscaled, accumulated) gradients."""
        assert self.regularizer is not None
        self.regularizer.add_penalty_gradient()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        """Step the regularizer once per optimizer step taken."""
        assert self.regularizer is not None
        while self._seen_step < trainer.global_step:
            self._seen_step += 1
            self.regularizer.step()
