"""timm models through the zoo's check: prune 0.3, export, INT8, INT8 compared with FP32.

The same check as benchmarks/zoo.py (`zoo.check_model`) on a list of timm models across its
families, random weights fitted briefly (`zoo.give_signal`), 10 classes. timm is a
benchmark and test extra (`pip install timm`), not a dependency of compressor.

    python benchmarks/timm_zoo.py                    # the whole list, 64x64 where it runs
    python benchmarks/timm_zoo.py resnet18d vit_tiny_patch16_224

Each model runs in its own process. Prints a table and writes benchmarks/results/timm_zoo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"

# (family, model name); chosen to cover timm's families at their smallest size
MODELS = [
    ("ResNet-D", "resnet18d"),
    ("ResNet-D", "resnet26d"),
    ("ResNet-D", "resnet50d"),
    ("SE-ResNeXt", "seresnext26d_32x4d"),
    ("ResNeSt", "resnest14d"),
    ("Res2Net", "res2net50_14w_8s"),
    ("EfficientNet", "efficientnet_b0"),
    ("EfficientNet-Lite", "efficientnet_lite0"),
    ("EfficientNet-Lite", "tf_efficientnet_lite0"),
    ("MobileNetV2", "mobilenetv2_100"),
    ("MobileNetV3", "mobilenetv3_small_100"),
    ("MobileNetV3", "mobilenetv3_large_100"),
    ("MNASNet", "mnasnet_100"),
    ("MixNet", "mixnet_s"),
    ("FBNet", "fbnetc_100"),
    ("LCNet", "lcnet_050"),
    ("TinyNet", "tinynet_e"),
    ("GhostNet", "ghostnet_100"),
    ("RegNet", "regnetx_002"),
    ("RegNet", "regnety_002"),
    ("RexNet", "rexnet_100"),
    ("ConvNeXt", "convnext_atto"),
    ("ConvNeXt", "convnext_femto"),
    ("CSPNet", "cspresnet50"),
    ("CSPNet", "cspdarknet53"),
    ("DarkNet", "darknet17"),
    ("RepVGG", "repvgg_a0"),
    ("RepVGG", "repvgg_b0"),
    ("DLA", "dla34"),
    ("DenseNet", "densenet121"),
    ("DPN", "dpn68"),
    ("VoVNet", "ese_vovnet19b_dw"),
    ("SelecSLS", "selecsls42b"),
    ("HRNet", "hrnet_w18_small"),
    ("ViT", "vit_tiny_patch16_224"),
    ("ViT", "vit_small_patch16_224"),
    ("DeiT", "deit_tiny_patch16_224"),
    ("DeiT", "deit_small_patch16_224"),
    ("Swin", "swin_tiny_patch4_window7_224"),
    ("MobileViT", "mobilevit_xxs"),
    ("MobileViT", "mobilevitv2_050"),
    ("LeViT", "levit_128s"),
    ("PoolFormer", "poolformer_s12"),
    ("EfficientFormer", "efficientformer_l1"),
]
# models built for one input size (their position embeddings, windows or attention biases)
FIXED_224 = ("swin_", "levit_", "efficientformer_")


def build(name: str, size: int) -> Any:
    """timm's ``name``, random weights, 10 classes, for ``size`` inputs where it takes one."""
    import timm

    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 10}
    if name.startswith(("vit_", "deit_")):
        kwargs["img_size"] = size
    return timm.create_model(name, **kwargs).eval()


def input_size(name: str, size: int) -> int:
    return 224 if name.startswith(FIXED_224) else size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="timm model names (default: the list)")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--timeout", type=int, default=900, help="seconds per model")
    parser.add_argument("--out", type=Path, default=RESULTS / "timm_zoo.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        from zoo import check_model

        size = input_size(args.one, args.input_size)
        row = check_model(build(args.one, size), args.one, size, args.threads, latency=False)
        print("ZOO-ROW " + json.dumps(row))
        return 0
    from zoo import run_each

    families = dict((n, f) for f, n in MODELS)
    names = args.models or [n for _f, n in MODELS]

    def annotate(row: dict[str, Any]) -> None:
        row["family"] = families.get(row["model"], "")

    rows = run_each(__file__, names, args, [], annotate, _line)
    passed = sum(r["status"] == "pass" for r in rows)
    print(f"\n{passed}/{len(rows)} timm models pruned, with an INT8 file that agrees with FP32")
    return 0 if passed == len(rows) else 1


def _line(r: dict[str, Any]) -> str:
    from zoo import _line as zoo_line

    return f"| {r.get('family', '')} " + zoo_line(r)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
