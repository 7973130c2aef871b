"""Ship a trained student: `python -m distill.export --ckpt students/RUN/checkpoints/best.ckpt`.

The ONNX graph takes raw uint8 RGB `image [N, 3, H, W]` (any N, H, W) and returns vessel logits
`[N, 1, H, W]`: normalisation and padding are inside the student, so a deployment needs no
preprocessing code. The threshold chosen on validation travels in the model's metadata
(`chosen_threshold`), next to the student's config, so `sigmoid(logits) >= chosen_threshold` is the
mask the evaluation reported. Every export is checked against PyTorch with onnxruntime on random
images of two sizes before it is declared done.

`--views d4` folds test-time views into the graph (flips and transposes of the input, the inverse
moves on each output, the logit mean), so the ONNX model is the student averaged over them; the
threshold is then the one `fit` chose on validation over the same views (`model.test_views`).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill import __version__
from distill.cli import optional_path, reports_user_errors, views_flag
from distill.errors import ConfigError, DistillError
from distill.students import chosen_threshold, load_student
from distill.views import ViewMean

TOLERANCE = 1e-4


def export_onnx(
    ckpt: str | Path,
    out: str | Path,
    opset: int = 17,
    check_sizes: tuple[int, ...] = (64, 90),
    views: list[str] | None = None,
) -> dict:
    """Export the student of `ckpt` (averaged over `views`, if any) to ONNX at `out`.

    Returns the metadata and the measured error; raises DistillError when onnxruntime and PyTorch
    differ by more than TOLERANCE.
    """
    student, info = load_student(ckpt)
    views = list(views or [])
    model = ViewMean(student, views).eval() if views else student
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randint(0, 256, (1, 3, check_sizes[0], check_sizes[0]), dtype=torch.uint8)
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) is the one that needs no onnxscript and keeps
        # the spatial size dynamic for this graph; its deprecation notice is not actionable here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(out),
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": axes, "logits": axes},
            opset_version=opset,
        )
    metadata = {
        "chosen_threshold": chosen_threshold(info, views),
        "views": views,
        "threshold_rule": info.get("threshold_rule"),
        "student": info["student"],
        "params": info["params"],
        "input": "image: uint8 RGB [N, 3, H, W], any size; normalisation is inside the model",
        "output": "logits: float32 [N, 1, H, W] (mean over `views`); mask = sigmoid(logits) >= chosen_threshold",
        "source_checkpoint": str(ckpt),
        "distill_version": __version__,
    }
    _set_metadata(out, metadata)
    error = max_abs_error(model, out, check_sizes)
    if error > TOLERANCE:
        raise DistillError(
            f"{out}: ONNX output differs from PyTorch by {error:.2e} (> {TOLERANCE}); do not ship it"
        )
    return {**metadata, "max_abs_error": error, "path": str(out)}


def _set_metadata(path: Path, metadata: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    onnx.save(model, str(path))


def is_onnx(path: str | Path) -> bool:
    """Whether `path` names an ONNX model: `predict` tells a model's kind by this suffix alone."""
    return Path(path).suffix.lower() == ".onnx"


def load_exported(path: str | Path) -> Any:
    """The onnx.ModelProto (weights left on disk) of a model `export_onnx` wrote.

    A missing file, one that is not ONNX, or an ONNX graph that does not map `image` to `logits` is
    refused in words, not with protobuf's DecodeError or onnxruntime's errors."""
    import onnx
    from google.protobuf.message import DecodeError

    path, fix = Path(path), "give a .onnx written by `python -m distill.export`"
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; {fix}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as err:
        raise ConfigError(f"{path}: not an ONNX model ({err}); {fix}") from err
    if not model.graph.node:
        raise ConfigError(f"{path}: not an ONNX model (it holds no graph); {fix}")
    names = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    if names != (["image"], ["logits"]):
        raise ConfigError(
            f"{path}: an ONNX model with inputs and outputs {names}, not image -> logits; {fix}"
        )
    return model


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata written by `export_onnx` (JSON values decoded)."""
    out = {}
    for entry in load_exported(path).metadata_props:
        try:
            out[entry.key] = json.loads(entry.value)
        except json.JSONDecodeError:
            out[entry.key] = entry.value
    return out


@torch.no_grad()
def max_abs_error(student: torch.nn.Module, onnx_path: Path, sizes: tuple[int, ...], seed: int = 0) -> float:
    """Largest |onnxruntime - PyTorch| logit difference on random images of each size (two per batch)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for size in sizes:
        images = torch.randint(0, 256, (2, 3, size, size + 8), dtype=torch.uint8, generator=generator)
        expected = student(images).numpy()
        got = session.run(["logits"], {"image": images.numpy()})[0]
        if got.shape != expected.shape:
            raise DistillError(f"{onnx_path}: ONNX output shape {got.shape} != PyTorch {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def checked_out(out: Path) -> Path:
    """`--out`, refused unless named *.onnx: `predict` would take any other name for a checkpoint. Not
    renamed either: the file would not be where the user (or a script) looks for it."""
    if not is_onnx(out):
        suggestion = out / "student.onnx" if out.is_dir() else out.with_name(f"{out.name}.onnx")
        raise ConfigError(
            f"--out {out}: an ONNX file's name must end in .onnx (predict tells models by it); give {suggestion}"
        )
    return out


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distill.export",
        description="Export a trained student to ONNX (raw uint8 RGB in, logits out, threshold in metadata).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""example:
  python -m distill.export --ckpt students/demo/checkpoints/best.ckpt --out students/demo/student.onnx
  python -m distill.predict --model students/demo/student.onnx --images my_images/ --out predictions/""",
    )
    parser.add_argument("--ckpt", type=Path, required=True, help="a checkpoint written by distill.fit")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="export format (onnx)")
    parser.add_argument(
        "--out",
        type=optional_path,
        default=None,
        help="output file, named *.onnx: predict tells an ONNX model by that suffix; another name is "
        "refused, not renamed (default: <ckpt dir>/../student.onnx)",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument(
        "--views",
        type=views_flag,
        default=None,
        help="fold these test-time views into the graph (d4 = all 8)",
    )
    args = parser.parse_args(argv)
    out = checked_out(args.out or args.ckpt.parent.parent / "student.onnx")
    result = export_onnx(args.ckpt, out, opset=args.opset, views=args.views)
    print(
        f"wrote {out} ({result['params']:,} parameters, views {result['views'] or 'none'}, "
        f"chosen threshold {result['chosen_threshold']}); "
        f"max |onnx - torch| = {result['max_abs_error']:.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
