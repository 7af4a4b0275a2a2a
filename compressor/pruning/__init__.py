"""Structured pruning: the plan (coupled channel groups, allocation), the engine that
removes channels through torch-pruning, the checks after it, sensitivity, MACs/size/latency
targets and their search, the latency table, and sparsity training that prepares it.

May import: the top-level contracts, `stage`, `models`, `runtime`, `training`. It reaches the INT8
stage (to time a candidate as it will ship) through `stage.Quantizer`, never by import.
"""
