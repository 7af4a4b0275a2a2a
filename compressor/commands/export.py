"""compressor export: the artifact for a serving engine (a Triton model repository, a KServe
InferenceService), with the batching settings the load test measured."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError
from .common import check_positive, replicas_range


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    export = commands.add_parser(
        "export",
        parents=[common],
        help="write an ONNX file's Triton model repository or KServe InferenceService",
        description="Put MODEL.onnx on a serving engine past one machine. The batching "
        "settings come from the load test that measured the file (the report.json beside it, "
        "or --settings-from), with any flag given here on top; without one, the defaults of "
        "compressor serve.",
    )
    engines = export.add_subparsers(dest="engine", metavar="ENGINE", required=True)
    triton = engines.add_parser(
        "triton",
        parents=[common],
        help="a Triton model repository: REPO/NAME/config.pbtxt and REPO/NAME/1/model.onnx",
    )
    _add_common(triton)
    triton.add_argument(
        "--output", type=Path, required=True, metavar="REPO", help="the model repository folder"
    )
    triton.set_defaults(func=_triton)
    kserve = engines.add_parser(
        "kserve",
        parents=[common],
        help="a KServe InferenceService (YAML) serving the Triton repository at a storage URI",
    )
    _add_common(kserve)
    kserve.add_argument(
        "--storage-uri",
        required=True,
        metavar="URI",
        help="where the model repository (compressor export triton) is uploaded: s3://..., "
        "gs://..., pvc://...",
    )
    kserve.add_argument("--output", type=Path, required=True, metavar="FILE.yaml")
    kserve.add_argument(
        "--replicas", type=int, default=1, metavar="N", help="replicas (default: 1)"
    )
    kserve.add_argument(
        "--autoscale",
        metavar="MIN:MAX",
        help="scale between MIN and MAX replicas on concurrent requests (the target per "
        "replica: the concurrency where the load test found the best setting)",
    )
    kserve.set_defaults(func=_kserve)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, metavar="MODEL.onnx")
    parser.add_argument("--name", help="the model's name (default: from the file's name)")
    parser.add_argument(
        "--settings-from",
        type=Path,
        metavar="JSON",
        help="a report.json with a load section, or the output of compressor load --json "
        "(default: the report.json beside MODEL.onnx, when it load-tested it)",
    )
    for flag, kind, meaning in (
        ("--max-batch", int, "largest batch the engine forms (its max_batch_size)"),
        ("--max-wait-ms", float, "longest a request waits for others to join its batch"),
        ("--max-queue", int, "most requests waiting before the engine refuses more"),
        ("--sessions", int, "model instances side by side (Triton's instance_group count)"),
        ("--threads", int, "intra-op threads per instance"),
    ):
        parser.add_argument(flag, type=kind, metavar="N", help=meaning)


def _settings(args: argparse.Namespace) -> tuple[Any, dict[str, Any] | None]:
    """The measured settings for the file, with the flags given on top."""
    from ..runtime.batching import BatchSettings
    from ..runtime.engines import measured_settings, settings_beside
    from ..runtime.measure import default_threads

    check_positive(args, "max_batch", "max_queue", "sessions", "threads")
    if args.model.suffix != ".onnx" or not args.model.is_file():
        raise UserError(f"no ONNX file at {str(args.model)!r}")
    best = None
    if args.settings_from:
        try:
            results = json.loads(args.settings_from.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            msg = f"--settings-from {args.settings_from}: not readable JSON ({exc})"
            raise UserError(msg) from None
        found = measured_settings(results, args.model.name)
        if found is None:
            msg = f"{args.settings_from} has no load test of {args.model.name}"
            raise UserError(msg)
        settings, best = found
        print(f"compressor: settings from {args.settings_from}: {best['label']}", flush=True)
    elif beside := settings_beside(args.model):
        settings, best, report = beside
        print(f"compressor: settings from {report}: {best['label']}", flush=True)
    else:
        sessions = args.sessions or 1
        settings = BatchSettings(16, 2.0, sessions, max(1, default_threads() // sessions))
    given = {
        key: getattr(args, key)
        for key in ("max_batch", "max_wait_ms", "max_queue", "sessions", "threads")
        if getattr(args, key) is not None
    }
    return dataclasses.replace(settings, **given), best  # BatchSettings checks each value


def _triton(args: argparse.Namespace) -> int:
    from ..runtime.engines import write_triton_repository

    settings, _ = _settings(args)
    folder = write_triton_repository(args.model, args.output, settings, args.name)
    print(f"compressor: wrote {folder} ({settings.label}); tritonserver --model-repository "
          f"{args.output}", flush=True)  # fmt: skip
    return 0


def _kserve(args: argparse.Namespace) -> int:
    import yaml

    from .._io import write_text
    from ..runtime.engines import inference_service

    settings, best = _settings(args)
    check_positive(args, "replicas")
    replicas = replicas_range(args.replicas, args.autoscale)
    name = args.name or re.sub(r"[^a-z0-9-]+", "-", args.model.stem.lower()).strip("-")
    target = best["concurrency"] if (best and args.autoscale) else None
    manifest = inference_service(name, args.storage_uri, settings, replicas, target)
    if args.output.exists():
        raise UserError(f"{args.output} exists already (nothing was written)")
    write_text(args.output, yaml.safe_dump(manifest, sort_keys=False))
    print(f"compressor: wrote {args.output}; kubectl apply -f {args.output}", file=sys.stdout)
    return 0
