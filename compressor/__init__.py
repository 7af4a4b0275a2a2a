"""compressor: take a trained PyTorch model to a small, fast INT8 ONNX artifact, with a report."""

from ._version import __version__ as __version__
from .data import DataSpec as DataSpec
from .errors import CompressorError as CompressorError
from .errors import DataError as DataError
from .errors import ExportError as ExportError
from .errors import ModelError as ModelError
from .errors import RecipeError as RecipeError
from .errors import UserError as UserError
from .models import adapters as adapters
from .models.adapter import Adapter as Adapter
from .models.adapter import Attention as Attention
from .models.adapter import class_named as class_named
from .models.adapters import register_adapter as register_adapter
from .models.detection import DetectionHead as DetectionHead
from .models.detection import mean_ap as mean_ap
from .models.model_io import ModelIO as ModelIO
from .models.model_io import SelectOutput as SelectOutput
from .models.model_io import mean_iou as mean_iou
from .pipeline.compare import compare as compare
from .pipeline.pipeline import Pipeline as Pipeline
from .pipeline.pipeline import PipelineResult as PipelineResult
from .pipeline.pipeline import RunContext as RunContext
from .pipeline.pipeline import State as State
from .pruning.planning import PruningPlan as PruningPlan
from .pruning.planning import plan_pruning as plan_pruning
from .pruning.planning import prune as prune
from .pruning.regularizer import SparsityRegularizer as SparsityRegularizer
from .pruning.sparsity import SparsityTraining as SparsityTraining
from .pruning.structured import StructuredPruning as StructuredPruning
from .pruning.structured import pruning_sensitivity as pruning_sensitivity
from .quantization.budget import int8_sensitivity as int8_sensitivity
from .quantization.int8 import Int8Quantization as Int8Quantization
from .quantization.quantize import quantize as quantize
from .report.report import Report as Report
from .report.report import Row as Row
from .runtime.batching import BatchSettings as BatchSettings
from .runtime.batching import DynamicBatcher as DynamicBatcher
from .runtime.export import export_onnx as export_onnx
from .runtime.load import LoadTest as LoadTest
from .runtime.load import load_file as load_file
from .runtime.load import load_url as load_url
from .runtime.serve import serve as serve
from .stage import Stage as Stage
from .stage import register_stage as register_stage
from .training.distillation import Distillation as Distillation
from .training.teacher import DistillationLoss as DistillationLoss

__all__ = [
    "Adapter",
    "Attention",
    "BatchSettings",
    "CompressorError",
    "DataError",
    "DataSpec",
    "DetectionHead",
    "Distillation",
    "DistillationLoss",
    "DynamicBatcher",
    "ExportError",
    "Int8Quantization",
    "LoadTest",
    "ModelError",
    "ModelIO",
    "Pipeline",
    "PipelineResult",
    "PruningPlan",
    "RecipeError",
    "Report",
    "Row",
    "RunContext",
    "SelectOutput",
    "SparsityRegularizer",
    "SparsityTraining",
    "Stage",
    "State",
    "StructuredPruning",
    "UserError",
    "__version__",
    "adapters",
    "class_named",
    "compare",
    "export_onnx",
    "int8_sensitivity",
    "load_file",
    "load_url",
    "mean_ap",
    "mean_iou",
    "plan_pruning",
    "prune",
    "pruning_sensitivity",
    "quantize",
    "register_adapter",
    "register_stage",
    "serve",
]
