"""A real-image segmentation task that installs offline: Fashion-MNIST items on a canvas.

Each sample is a ``size x size`` canvas holding 1 to `MAX_ITEMS` Fashion-MNIST images
(28x28) at random places; its mask gives every pixel a class: 0 for the background, and
``1 + the item's class`` (1..10) where an item's pixel is brighter than `FOREGROUND` of
full scale. A later item covers an earlier one where they overlap, in image and mask
alike. Canvases are drawn from the sample's index and the seed, so a data set is the same
on every pass and every machine; the validation canvases use only the test split's items.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

CLASSES = 11  # background + Fashion-MNIST's 10 classes
MAX_ITEMS = 3
FOREGROUND = 0.2
ITEM = 28


class FashionCanvas(Dataset):
    """``(image, mask)`` pairs: a ``(channels, size, size)`` normalised float image and a
    ``(size, size)`` int64 mask of classes 0..10 (see the module doc).

    Args:
        images: ``(N, 28, 28)`` uint8 Fashion-MNIST images.
        labels: ``(N,)`` their classes 0..9.
        samples: canvases in the data set.
        size: canvas side in pixels (>= 28).
        channels: 1, or 3 (the gray canvas repeated, for RGB models).
        mean, std: normalisation of the canvas's [0, 1] values.
        seed: draws the canvases.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        samples: int,
        size: int = 64,
        channels: int = 1,
        mean: float = 0.1,
        std: float = 0.25,
        seed: int = 0,
    ) -> None:
        if size < ITEM:
            msg = f"a Fashion-MNIST canvas must be at least {ITEM} pixels wide (got: {size})"
            raise ValueError(msg)
        if channels not in (1, 3):
            msg = f"channels must be 1 or 3 (got: {channels})"
            raise ValueError(msg)
        self.images, self.labels = images, labels
        self.samples, self.size, self.channels = samples, size, channels
        self.mean, self.std, self.seed = mean, std, seed

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.samples:
            raise IndexError(index)
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        canvas = torch.zeros(self.size, self.size)
        mask = torch.zeros(self.size, self.size, dtype=torch.int64)
        items = int(torch.randint(1, MAX_ITEMS + 1, (1,), generator=rng))
        picks = torch.randint(0, len(self.images), (items,), generator=rng)
        corners = torch.randint(0, self.size - ITEM + 1, (items, 2), generator=rng)
        for pick, (y, x) in zip(picks.tolist(), corners.tolist(), strict=True):
            item = self.images[pick].float() / 255
            on = item > FOREGROUND
            window = (slice(y, y + ITEM), slice(x, x + ITEM))
            canvas[window] = torch.where(on, item, canvas[window])
            mask[window] = torch.where(on, int(self.labels[pick]) + 1, mask[window])
        image = ((canvas - self.mean) / self.std).unsqueeze(0)
        return image.expand(self.channels, -1, -1).contiguous(), mask
