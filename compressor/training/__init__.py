"""Training: the one train loop every training stage uses (with its optimizer probe), the
loss against the original model (`teacher`), the distillation stage, and the helpers for
data-parallel runs under torchrun.

May import: the top-level contracts, `models`, `runtime`, `stage`.
"""
