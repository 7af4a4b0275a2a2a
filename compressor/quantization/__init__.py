"""INT8 quantization: the stage (static QDQ or dynamic INT8 in ONNX Runtime), the ONNX
graph edits around it, the INT8 types for this CPU, FP32 placement and the accuracy budget.

May import: the top-level contracts, `stage`, `models`, `runtime`, `training` (QAT's loop). It
offers itself to other stages as the `stage.Quantizer` the run uses.
"""
