"""What the library knows about models: the adapter registry and its adapters (torch,
torchvision, transformers, detection), the description of a model's inputs and outputs
(`model_io`), layer helpers, checkpoints, the detection head and self-attention
restructuring.

May import: the top-level contracts (`errors`, `inputs`, `data`, `_io`). Nothing else in the
package tests class names; model-specific knowledge lives here.
"""
