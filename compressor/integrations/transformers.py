"""`SparsityCallback` for the Hugging Face ``Trainer``: the sparsity regularizer in
``Trainer.train()``.

    pip install 'compressor[transformers]'
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..errors import UserError
from ..pruning.planning import PruningPlan, module_for_plan
from ..pruning.regularizer import SparsityRegularizer


class SparsityCallback(TrainerCallback):
    """Drive the channels of a pruning plan to zero during ``Trainer.train()``.

    The plan (`compressor.plan_pruning`) is made for the model the Trainer trains (or a
    submodule of it, found by structure). Before every optimizer step (after gradient
    accumulation and clipping) the regularizer's L1 penalty adds its gradient; after it,
    the regularizer steps, so the planned channels reach zero at ``ramp`` of the run's
    ``max_steps`` (``state.max_steps`` unless ``total_steps`` is given).

    Example:
        >>> plan = cz.plan_pruning(model, example, ratio=0.5)                # doctest: +SKIP
        >>> Trainer(model, args, callbacks=[SparsityCallback(plan)]).train() # doctest: +SKIP

    Args:
        plan: the pruning plan.
        ramp, l1: as `SparsityRegularizer`'s.
        total_steps: optimizer steps of the run (default: the Trainer's ``max_steps``).
    """

    def __init__(
        self,
        plan: PruningPlan,
        *,
        ramp: float = 0.25,
        l1: float = 1e-4,
        total_steps: int | None = None,
    ) -> None:
        if not hasattr(TrainerCallback, "on_pre_optimizer_step"):
            msg = "SparsityCallback needs transformers >= 4.47 (its on_pre_optimizer_step event)"
            raise UserError(msg)
        self.plan = plan
        self.ramp = ramp
        self.l1 = l1
        self.total_steps = total_steps
        self.regularizer: SparsityRegularizer | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Build the regularizer on the planned model, for the run's optimizer steps."""
        total = self.total_steps or int(state.max_steps)
        network = module_for_plan(kwargs["model"], self.plan)
        self.regularizer = SparsityRegularizer(
            network, self.plan, total_steps=total, ramp=self.ramp, l1=self.l1
        )

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Add the L1 penalty's gradient before the optimizer steps."""
        assert self.regularizer is not None
        self.regularizer.add_penalty_gradient()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Step the regularizer after each optimizer step."""
        assert self.regularizer is not None
        self.regularizer.step()
