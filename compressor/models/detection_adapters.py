"""torchvision's SSD detectors (SSD300-VGG16, SSDlite320-MobileNetV3) as dense models.

`dense_ssd` takes an ``SSD`` apart: `DenseSSD` keeps its normalisation, backbone and head
(the parts that are pruned, distilled, exported and quantized) and returns one
``(N, A, 4 + C)`` tensor; `compressor.models.detection.DetectionHead` keeps what follows (default
boxes for the example's image size, the box coder, matching, score and NMS thresholds).
torchvision's own resize is left out: images come at the size the detector was given
(its default boxes are computed for it). Nothing here imports torchvision's detection
modules before a detector is seen.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapter import Adapter, class_named
from .detection import DetectionHead

SSD = "torchvision.models.detection.ssd.SSD"


class DenseSSD(nn.Module):
    """An SSD without resize and post-processing: ``[0, 1]`` images -> ``(N, A, 4 + C)``
    (box offsets, then class scores with 0 the background)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, mean: Any, std: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Box offsets and class scores of every default box."""
        features = self.backbone((images - self.mean) / self.std)
        features = list(features.values()) if isinstance(features, dict) else [features]
        out = self.head(features)
        return torch.cat([out["bbox_regression"], out["cls_logits"]], dim=-1)


class PerBoxScores(nn.Module):
    """What torchvision's ``SSDScoringHead`` computes, ``(N, sum of H * W * A, K)`` from
    the ``(N, A * K, H, W)`` maps of its ``module_list``, with one reshape for all maps
    instead of a ``view`` per map: the exported graph reads the batch size once, not each
    map's four sizes (that shape arithmetic was about a quarter of a small detector's time
    in ONNX Runtime). Holds the same ``module_list``, so parameter names do not change."""

    def __init__(self, module_list: nn.ModuleList, num_columns: int) -> None:
        super().__init__()
        self.module_list = module_list
        self.num_columns = num_columns

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Per default box: ``num_columns`` numbers (offsets or class scores)."""
        maps = zip(self.module_list, features, strict=True)
        flat = torch.cat([torch.flatten(m(f).permute(0, 2, 3, 1), 1) for m, f in maps], dim=1)
        return flat.view(flat.shape[0], -1, self.num_columns)


class PerBoxHead(nn.Module):
    """torchvision's ``SSDHead`` (and ``SSDLiteHead``) with `PerBoxScores` parts."""

    def __init__(self, classification_head: nn.Module, regression_head: nn.Module) -> None:
        super().__init__()
        self.classification_head = classification_head
        self.regression_head = regression_head

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Box offsets and class scores, as ``SSDHead.forward`` returns them."""
        return {
            "bbox_regression": self.regression_head(features),
            "cls_logits": self.classification_head(features),
        }


def per_box_head(head: nn.Module) -> nn.Module:
    """``head`` with `PerBoxScores` parts when it is torchvision's ``SSDHead`` or
    ``SSDLiteHead`` (their parts' own forward); any other head as it is."""
    from torchvision.models.detection.ssd import SSDHead, SSDScoringHead
    from torchvision.models.detection.ssdlite import SSDLiteHead

    if type(head) not in (SSDHead, SSDLiteHead):
        return head
    parts = (head.classification_head, head.regression_head)
    if any(type(p).forward is not SSDScoringHead.forward for p in parts):
        return head
    return PerBoxHead(*(PerBoxScores(p.module_list, p.num_columns) for p in parts))


def dense_ssd(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, DetectionHead]:
    """`DenseSSD` of torchvision ``SSD`` ``model`` and its `DetectionHead` for images of
    ``example``'s size."""
    from torchvision.models.detection.image_list import ImageList

    size = (int(example.shape[-2]), int(example.shape[-1]))
    transform = model.transform
    scores = per_box_head(model.head)
    dense = DenseSSD(model.backbone, scores, transform.image_mean, transform.image_std)
    was_training = dense.training
    dense.eval()
    with torch.no_grad():
        features = dense.backbone((example[:1] - dense.mean) / dense.std)
        features = list(features.values()) if isinstance(features, dict) else [features]
        anchors = model.anchor_generator(ImageList(example[:1], [size]), features)[0]
    dense.train(was_training)
    head = DetectionHead(
        anchors=anchors.detach().cpu(),
        image_size=size,
        box_weights=tuple(float(w) for w in model.box_coder.weights),
        iou_threshold=float(model.proposal_matcher.high_threshold),
        negatives_per_positive=float(model.neg_to_pos_ratio),
        score_threshold=max(0.01, float(model.score_thresh)),
        nms_threshold=float(model.nms_thresh),
        candidates_per_class=int(model.topk_candidates),
        detections_per_image=int(model.detections_per_img),
        keep_fp32=tuple(f"head.{name}" for name in last_layers(model.head)),
    )
    return dense, head


def last_layers(head: nn.Module) -> list[str]:
    """The last Conv2d of each feature map's branch in the classification and regression
    heads: their outputs are per-anchor scores and offsets, so pruning leaves them whole
    and INT8 keeps them in FP32."""
    names = []
    for part in ("classification_head", "regression_head"):
        for i, branch in enumerate(head.get_submodule(part).module_list):
            convs = [n for n, m in branch.named_modules() if isinstance(m, nn.Conv2d)]
            if convs:
                names.append(f"{part}.module_list.{i}" + (f".{convs[-1]}" if convs[-1] else ""))
    return names


ADAPTERS = [
    Adapter("torchvision_ssd", matches=class_named(SSD), detector=dense_ssd),
    Adapter(
        "torchvision_ssd_dense",
        matches=lambda m: isinstance(m, DenseSSD),
        leave_whole=lambda m: [f"head.{n}" for n in last_layers(m.head)],
    ),
]
