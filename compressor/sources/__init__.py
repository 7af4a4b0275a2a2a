"""Where models and data come from, for the CLI: model specs (torchvision:, hf:, files,
factories, checkpoints), data specs (imagefolder:, fashion-mnist:, text, the embedded demos,
segmentation and detection canvases), Hugging Face loading, and the checks that a model fits
its data.

May import: the top-level contracts and `models`.
"""
