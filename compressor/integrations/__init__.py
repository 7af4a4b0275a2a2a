"""Callbacks that put the own-loop pieces into training frameworks: the sparsity regularizer
in a PyTorch Lightning ``fit`` (`compressor.integrations.lightning`) and a Hugging Face
``Trainer.train()`` (`compressor.integrations.transformers`). Each imports its framework
(an optional extra) only when imported itself.

May import: the contracts, models, runtime, stage, training, pruning.
"""
