"""Training: the one train loop every training stage uses, the distillation stage and its
loss, and the helpers for data-parallel runs under torchrun.

May import: the top-level contracts, `models`, `runtime`.
"""
