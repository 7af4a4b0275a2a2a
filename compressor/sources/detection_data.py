"""A real-image detection task that installs offline: Fashion-MNIST items on a canvas.

Each sample is a ``size x size`` canvas holding 1 to `MAX_ITEMS` Fashion-MNIST images,
each scaled to a random side of 28 up to `MAX_SCALE` x 28 pixels (at most half the canvas)
and placed where it overlaps no earlier item's box by more than `MAX_OVERLAP` IoU (an
item that finds no such place after a few tries is left out). Every item is one object:
its box is the tight box of its pixels brighter than `FOREGROUND` of full scale, its class
``1 + the item's class`` (1..10; 0 is the detector's background). Canvases are drawn from
the sample's index and the seed, so a data set is the same on every pass and machine; the
validation canvases use only the test split's items. Images are in ``[0, 1]`` (a
torchvision detector normalises them itself).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

CLASSES = 11  # background + Fashion-MNIST's 10 classes
MAX_ITEMS = 4
MAX_SCALE = 2.0
MAX_OVERLAP = 0.3
FOREGROUND = 0.2
ITEM = 28


class FashionDetection(Dataset):
    """``(image, targets)`` pairs: a ``(channels, size, size)`` float image in ``[0, 1]``
    and ``(k, 5)`` targets ``[class, x1, y1, x2, y2]`` (see the module doc); batch them
    with `compressor.models.detection.collate`.

    Args:
        images: ``(N, 28, 28)`` uint8 Fashion-MNIST images.
        labels: ``(N,)`` their classes 0..9.
        samples: canvases in the data set.
        size: canvas side in pixels (>= 56).
        channels: 1, or 3 (the gray canvas repeated, for RGB models).
        seed: draws the canvases.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        samples: int,
        size: int = 160,
        channels: int = 3,
        seed: int = 0,
    ) -> None:
        if size < 2 * ITEM:
            msg = f"a detection canvas must be at least {2 * ITEM} pixels wide (got: {size})"
            raise ValueError(msg)
        if channels not in (1, 3):
            msg = f"channels must be 1 or 3 (got: {channels})"
            raise ValueError(msg)
        self.images, self.labels = images, labels
        self.samples, self.size, self.channels, self.seed = samples, size, channels, seed

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.samples:
            raise IndexError(index)
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        canvas = torch.zeros(self.size, self.size)
        objects: list[list[float]] = []
        largest = min(int(ITEM * MAX_SCALE), self.size // 2)
        items = int(torch.randint(1, MAX_ITEMS + 1, (1,), generator=rng))
        for _ in range(items):
            pick = int(torch.randint(0, len(self.images), (1,), generator=rng))
            side = int(torch.randint(ITEM, largest + 1, (1,), generator=rng))
            item = self.images[pick].float().div(255)[None, None]
            item = F.interpolate(item, size=(side, side), mode="bilinear", align_corners=False)[
                0, 0
            ]
            on = item > FOREGROUND
            if not on.any():
                continue
            rows, cols = on.any(1).nonzero(), on.any(0).nonzero()
            top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
            for _try in range(10):
                y, x = torch.randint(0, self.size - side + 1, (2,), generator=rng).tolist()
                box = [x + left, y + top, x + right + 1, y + bottom + 1]
                if all(_iou(box, other[1:]) <= MAX_OVERLAP for other in objects):
                    window = (slice(y, y + side), slice(x, x + side))
                    canvas[window] = torch.where(on, item, canvas[window])
                    objects.append([float(int(self.labels[pick]) + 1), *map(float, box)])
                    break
        image = canvas.unsqueeze(0).expand(self.channels, -1, -1).contiguous()
        return image, torch.tensor(objects, dtype=torch.float32).view(-1, 5)


def _iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
