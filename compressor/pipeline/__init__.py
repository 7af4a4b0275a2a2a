"""Orchestration: `Pipeline` (runs registered stages in order, measures each, checkpoints,
resumes, searches a pruning ratio under a budget), recipes, the output folder, the baseline
step the CLI runs before the stages, and the ranks of a data-parallel run.

May import: everything below it; it never names a stage: stages come from the registry in
`stage.py` and describe themselves there.
"""
