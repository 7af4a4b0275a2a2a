"""Rebuild compressor/sources/data/fashion_mnist_demo.npz from Fashion-MNIST's IDX files.

Usage: python scripts/make_demo_data.py [DIR]   (DIR holds the *-idx?-ubyte.gz files;
default: /usr/share/datasets/fashion-mnist, from Debian's dataset-fashion-mnist package)
"""

import gzip
import sys
from pathlib import Path

import numpy as np

TRAIN, VAL, CLASSES, SEED = 8000, 2000, 10, 0


def read_idx(path: Path, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.open(path).read(), np.uint8, offset=offset)


def balanced(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    per = n // CLASSES
    picks = [rng.choice(np.flatnonzero(labels == c), per, replace=False) for c in range(CLASSES)]
    return np.sort(np.concatenate(picks))


def main() -> None:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist")
    x_tr = read_idx(src / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    y_tr = read_idx(src / "train-labels-idx1-ubyte.gz", 8)
    x_te = read_idx(src / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    y_te = read_idx(src / "t10k-labels-idx1-ubyte.gz", 8)
    rng = np.random.default_rng(SEED)
    i, j = balanced(y_tr, TRAIN, rng), balanced(y_te, VAL, rng)
    out = (
        Path(__file__).resolve().parents[1]
        / "compressor"
        / "sources"
        / "data"
        / "fashion_mnist_demo.npz"
    )
    np.savez_compressed(
        out, train_images=x_tr[i], train_labels=y_tr[i], val_images=x_te[j], val_labels=y_te[j]
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
