"""Object detection on one dense output: anchors, the training loss, decoding and mAP.

A detector runs through compressor as its dense part (`compressor.models.adapter`'s ``detector``
hook makes it): images in, one tensor out, ``(N, A, 4 + C)``: for every one of the ``A``
anchors its four box offsets, then the scores of ``C`` classes, class 0 being the
background. That tensor is what pruning keeps the shape of, what distillation matches,
what the ONNX file returns and what INT8 is compared on. Box decoding, per-class
non-maximum suppression and the metric run after it, in FP32 torch, from `DetectionHead`:
the ONNX file ends before post-processing (`DetectionHead.detections` is its
post-processing, for deployment too).

Targets are one float tensor per batch, ``(N, K, 5)``: per image up to ``K`` objects as
``[class, x1, y1, x2, y2]`` in pixels, classes ``1..C-1``, rows of class ``-1`` padding
(`pad_targets` makes them from lists).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from .._io import write_text
from ..errors import UserError

PAD = -1  # the class of a padding row in a targets tensor
HEAD_FORMAT = "compressor.detection_head/1"
"""The ``format`` field of a `DetectionHead.save` file."""


@dataclass(frozen=True)
class DetectionHead:
    """What turns a detector's dense output into boxes, and how it is trained (SSD-style:
    softmax scores with a background class, default boxes matched by IoU, hard negatives).

    Args:
        anchors: ``(A, 4)`` default boxes ``x1, y1, x2, y2`` in pixels, for ``image_size``.
        image_size: ``(height, width)`` of the images the anchors are for.
        box_weights: the box coder's weights (x, y, w, h).
        iou_threshold: an anchor is matched to an object at this IoU or more (each object
            also takes its best anchor).
        negatives_per_positive: hard negatives per matched anchor in the class loss.
        score_threshold, nms_threshold, candidates_per_class, detections_per_image:
            decoding: scores kept, per-class NMS IoU, top-k per class before NMS, boxes kept.
        keep_fp32: the dense model's layers INT8 leaves in FP32 (the heads' last layers).
    """

    anchors: torch.Tensor = field(repr=False)
    image_size: tuple[int, int]
    box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    iou_threshold: float = 0.5
    negatives_per_positive: float = 3.0
    score_threshold: float = 0.01
    nms_threshold: float = 0.5
    candidates_per_class: int = 100
    detections_per_image: int = 100
    keep_fp32: tuple[str, ...] = ()

    def split(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(box offsets (N, A, 4), class scores (N, A, C))`` of a dense output."""
        if output.dim() != 3 or output.shape[1] != len(self.anchors) or output.shape[2] < 6:
            msg = (
                f"a detector's output must be (N, {len(self.anchors)} anchors, 4 + classes) "
                f"for {self.image_size[0]}x{self.image_size[1]} images (got: "
                f"{tuple(output.shape)}): give images of the size the detector was wrapped at"
            )
            raise UserError(msg)
        return output[..., :4], output[..., 4:]

    def loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """SSD's loss: smooth-L1 on matched anchors' boxes plus cross-entropy on matched
        anchors and the hardest ``negatives_per_positive`` times as many background ones,
        both divided by the number of matched anchors."""
        boxes, logits = self.split(output)
        anchors = self.anchors.to(output.device)
        coder = _box_coder(self.box_weights)
        classes = torch.zeros(logits.shape[:2], dtype=torch.long, device=output.device)
        box_loss = output.new_zeros(())
        positives = 0
        for i, (cls, gt) in enumerate(_objects(targets)):
            if not len(gt):
                continue
            matched = _match(gt.to(anchors), anchors, self.iou_threshold)
            fg = torch.where(matched >= 0)[0]
            positives += len(fg)
            wanted = coder.encode_single(gt.to(anchors)[matched[fg]], anchors[fg])
            box_loss = box_loss + F.smooth_l1_loss(boxes[i, fg], wanted, reduction="sum")
            classes[i, fg] = cls.to(output.device)[matched[fg]]
        per_anchor = F.cross_entropy(logits.flatten(0, 1), classes.flatten(), reduction="none")
        per_anchor = per_anchor.view(classes.shape)
        foreground = classes > 0
        negative = per_anchor.detach().masked_fill(foreground, -math.inf)
        wanted_negatives = self.negatives_per_positive * foreground.sum(1, keepdim=True)
        rank = negative.argsort(1, descending=True).argsort(1)
        background = rank < wanted_negatives
        class_loss = per_anchor[foreground].sum() + per_anchor[background].sum()
        return (box_loss + class_loss) / max(1, positives)

    def soft_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """Distillation: ``T^2`` KL of the class scores per anchor, plus smooth-L1 between
        the box offsets weighted by the teacher's foreground probability."""
        boxes_s, logits_s = self.split(student)
        boxes_t, logits_t = self.split(teacher)
        t = temperature
        kl = F.kl_div(
            F.log_softmax(logits_s / t, dim=-1),
            F.log_softmax(logits_t / t, dim=-1),
            reduction="sum",
            log_target=True,
        ) / max(1, logits_s.shape[0] * logits_s.shape[1])
        weight = 1 - logits_t.softmax(-1)[..., 0]
        boxes = F.smooth_l1_loss(boxes_s, boxes_t, reduction="none").sum(-1)
        return t * t * kl + (boxes * weight).sum() / weight.sum().clamp_min(1e-6)

    def detections(self, output: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per image ``{"boxes" (D, 4) x1 y1 x2 y2, "scores" (D,), "labels" (D,)}``: boxes
        decoded from the anchors, clipped to the image, per-class top-k, NMS, best first."""
        from torchvision.ops import batched_nms, clip_boxes_to_image

        offsets, logits = self.split(output.float())
        anchors = self.anchors.to(output.device)
        coder = _box_coder(self.box_weights)
        found = []
        for box_offsets, scores in zip(offsets, logits.softmax(-1), strict=True):
            boxes = clip_boxes_to_image(coder.decode_single(box_offsets, anchors), self.image_size)
            kept_boxes, kept_scores, kept_labels = [], [], []
            for label in range(1, scores.shape[1]):
                score = scores[:, label]
                keep = score > self.score_threshold
                score, box = score[keep], boxes[keep]
                score, order = score.topk(min(self.candidates_per_class, len(score)))
                kept_boxes.append(box[order])
                kept_scores.append(score)
                kept_labels.append(torch.full_like(order, label))
            boxes, scores, labels = map(torch.cat, (kept_boxes, kept_scores, kept_labels))
            keep = batched_nms(boxes, scores, labels, self.nms_threshold)
            keep = keep[: self.detections_per_image]
            found.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return found

    def save(self, path: str | Path) -> None:
        """Write the head as JSON (anchors included): what decodes the ONNX file's output
        where the run's Python objects are gone. A pipeline writes it as
        ``OUTPUT/detection_head.json``; `DetectionHead.load` reads it back."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["anchors"] = self.anchors.tolist()
        text = json.dumps({"format": HEAD_FORMAT, **fields}) + "\n"
        write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> DetectionHead:
        """The head `save` wrote to ``path``."""
        try:
            found = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            msg = f"cannot read a detection head from {str(path)!r}: {exc}"
            raise UserError(msg) from exc
        if not isinstance(found, dict) or found.pop("format", None) != HEAD_FORMAT:
            msg = f"{str(path)!r} is not a detection head file ({HEAD_FORMAT})"
            raise UserError(msg)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(found) - names)
        if unknown or "anchors" not in found or "image_size" not in found:
            msg = (
                f"{str(path)!r}: a detection head needs anchors and image_size and knows "
                f"{', '.join(sorted(names))} (got: {', '.join(sorted(found))})"
            )
            raise UserError(msg)
        anchors = torch.tensor(found.pop("anchors"), dtype=torch.float32)
        if anchors.dim() != 2 or anchors.shape[1] != 4:
            msg = f"{str(path)!r}: anchors must be (A, 4) boxes (got: {tuple(anchors.shape)})"
            raise UserError(msg)
        tuples = {k: tuple(v) for k, v in found.items() if isinstance(v, list)}
        return cls(anchors=anchors, **{**found, **tuples})

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the report."""
        return {
            "anchors": len(self.anchors),
            "image_size": list(self.image_size),
            "score_threshold": self.score_threshold,
            "nms_threshold": self.nms_threshold,
            "detections_per_image": self.detections_per_image,
            "fp32_layers": list(self.keep_fp32),
            "post_processing": "torch, FP32 (not in the ONNX file)",
        }


def _box_coder(weights: tuple[float, float, float, float]) -> Any:
    from torchvision.models.detection._utils import BoxCoder

    return BoxCoder(weights)


def _match(boxes: torch.Tensor, anchors: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per anchor the index of its object, -1 for none (SSD's matcher)."""
    from torchvision.models.detection._utils import SSDMatcher
    from torchvision.ops import box_iou

    return SSDMatcher(threshold)(box_iou(boxes, anchors))


def _objects(targets: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image ``(classes (K,), boxes (K, 4))`` of a padded targets tensor."""
    check_targets(targets)
    found = []
    for rows in targets:
        real = rows[rows[:, 0] != PAD]
        found.append((real[:, 0].long(), real[:, 1:].float()))
    return found


def check_targets(targets: Any) -> None:
    """Refuse targets that are not a ``(N, K, 5)`` tensor of ``[class, x1, y1, x2, y2]``."""
    if not isinstance(targets, torch.Tensor) or targets.dim() != 3 or targets.shape[-1] != 5:
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets)
        msg = (
            "detection targets must be one (N, K, 5) tensor per batch of [class, x1, y1, x2, "
            f"y2] rows, class -1 for padding (got: {shape}); "
            "compressor.models.detection.pad_targets makes it from lists of boxes and labels"
        )
        raise UserError(msg)


def pad_targets(
    boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], objects: int | None = None
) -> torch.Tensor:
    """One ``(N, K, 5)`` targets tensor from per-image ``(k, 4)`` boxes and ``(k,)`` labels
    (torchvision's target dicts), padded with class -1 rows to ``objects`` (default: the
    most any image has)."""
    most = max((len(b) for b in boxes), default=0)
    k = most if objects is None else objects
    if k < most:
        msg = f"objects={k} is fewer than an image has ({most})"
        raise UserError(msg)
    out = torch.zeros(len(boxes), max(k, 1), 5)
    out[..., 0] = PAD
    for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
        out[i, : len(b), 0] = lab.float()
        out[i, : len(b), 1:] = b.float()
    return out


def collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, Any]:
    """A DataLoader ``collate_fn`` for ``(image, (k, 5) targets)`` samples: the images
    stacked, the targets padded to one ``(N, K, 5)`` tensor."""
    images = torch.stack([image for image, _ in batch])
    rows = [t for _, t in batch]
    return images, pad_targets([r[:, 1:] for r in rows], [r[:, 0] for r in rows])


def mean_ap(predict: Callable[[Any], torch.Tensor], data: Any, *, head: DetectionHead) -> float:
    """COCO mAP (AP averaged over IoU 0.50:0.95, the best 100 boxes per image) of
    ``predict`` over all of ``data``, computed by pycocotools (the reference implementation)
    on `DetectionHead.detections`."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:
        msg = "mAP needs pycocotools: pip install 'compressor[detection]'"
        raise UserError(msg) from exc
    images, truth, found = [], [], []
    for batch in data:
        output = predict(data.input_fn(batch))
        for (classes, boxes), result in zip(
            _objects(torch.as_tensor(data.target_fn(batch)).cpu()),
            head.detections(output.detach().cpu()),
            strict=True,
        ):
            image = len(images) + 1
            images.append({"id": image})
            for c, b in zip(classes.tolist(), boxes.tolist(), strict=True):
                w, h = b[2] - b[0], b[3] - b[1]
                truth.append(_annotation(len(truth) + 1, image, c, b, area=w * h))
            for c, b, s in zip(
                result["labels"].tolist(), result["boxes"].tolist(), result["scores"].tolist(),
                strict=True,
            ):  # fmt: skip
                found.append(_annotation(len(found) + 1, image, c, b, score=s))
    if not truth:
        return float("nan")
    if not found:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO()
        classes = sorted({a["category_id"] for a in truth + found})
        coco.dataset = {
            "images": images,
            "annotations": truth,
            "categories": [{"id": c} for c in classes],
        }
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes(found), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return max(0.0, float(evaluation.stats[0]))


def _annotation(
    number: int, image: int, label: int, box: list[float], **extra: float
) -> dict[str, Any]:
    x1, y1, x2, y2 = box
    return {
        "id": number,
        "image_id": image,
        "category_id": int(label),
        "bbox": [x1, y1, x2 - x1, y2 - y1],
        "iscrowd": 0,
        **extra,
    }
