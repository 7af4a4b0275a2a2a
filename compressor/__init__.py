"""compressor: take a trained PyTorch model to a small, fast INT8 ONNX artifact, with a report."""

from . import adapters as adapters
from ._version import __version__ as __version__
from .adapter import Adapter as Adapter
from .adapter import Attention as Attention
from .adapter import class_named as class_named
from .adapters import register_adapter as register_adapter
from .batching import BatchSettings as BatchSettings
from .batching import DynamicBatcher as DynamicBatcher
from .data import DataSpec as DataSpec
from .detection import DetectionHead as DetectionHead
from .detection import mean_ap as mean_ap
from .distillation import Distillation as Distillation
from .errors import CompressorError as CompressorError
from .errors import DataError as DataError
from .errors import ExportError as ExportError
from .errors import ModelError as ModelError
from .errors import RecipeError as RecipeError
from .errors import UserError as UserError
from .export import export_onnx as export_onnx
from .int8_budget import int8_sensitivity as int8_sensitivity
from .load import LoadTest as LoadTest
from .load import load_file as load_file
from .load import load_url as load_url
from .model_io import ModelIO as ModelIO
from .model_io import SelectOutput as SelectOutput
from .model_io import mean_iou as mean_iou
from .pipeline import Pipeline as Pipeline
from .pipeline import PipelineResult as PipelineResult
from .pipeline import RunContext as RunContext
from .pipeline import State as State
from .pruning import StructuredPruning as StructuredPruning
from .pruning import pruning_sensitivity as pruning_sensitivity
from .quantization import Int8Quantization as Int8Quantization
from .report import Report as Report
from .report import Row as Row
from .serve import serve as serve
from .sparsity import SparsityTraining as SparsityTraining
from .stage import Stage as Stage
from .stage import register_stage as register_stage

__all__ = [
    "BatchSettings",
    "CompressorError",
    "DataError",
    "DataSpec",
    "DetectionHead",
    "Distillation",
    "DynamicBatcher",
    "ExportError",
    "Int8Quantization",
    "LoadTest",
    "ModelError",
    "ModelIO",
    "Pipeline",
    "PipelineResult",
    "RecipeError",
    "Report",
    "Row",
    "RunContext",
    "SelectOutput",
    "SparsityTraining",
    "Stage",
    "State",
    "StructuredPruning",
    "UserError",
    "export_onnx",
    "int8_sensitivity",
    "load_file",
    "load_url",
    "mean_ap",
    "mean_iou",
    "pruning_sensitivity",
    "register_stage",
    "serve",
]
