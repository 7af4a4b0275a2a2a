"""Running a model: ONNX export, ONNX file helpers, runtime settings (ONNX Runtime,
OpenVINO), the one measuring path every runtime shares, the dynamic batcher, the server and
the load test.

May import: the top-level contracts and `models`.
"""
