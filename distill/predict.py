"""Segment a folder of images: `python -m distill.predict --model best.ckpt|student.onnx --images DIR`.

For each image it writes `<out>/masks/<name>.png` (255 where prob >= the model's chosen threshold,
or `--threshold`; the rule the metrics use) and `<out>/probs/<name>.png` (probability x 255). The
threshold comes from the checkpoint or the ONNX metadata: the one chosen on validation, so the masks
are the ones the evaluation measured. Images are the files the dataset readers take
(`distill.data.images.IMAGE_SUFFIXES`), decoded the same way (EXIF orientation applied), except
what predict writes itself (`<out>/masks`, `<out>/probs`, when `--out` lies inside `--images`). Two
images that would write one mask (`x.png`, `x.jpg`) are refused before anything is written. An image
that does not read stops the run, or with `--skip-bad` is left out and listed at the end. `--views d4`
averages the model's logits over test-time views (for a checkpoint, with the threshold `fit` chose
over the same `model.test_views`).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from distill.cli import optional_path, probability, reports_user_errors, views_flag
from distill.data.images import IMAGE_SUFFIXES, check_bit_depth, read_image
from distill.errors import ConfigError, DatasetError
from distill.export import is_onnx, read_metadata
from distill.students import chosen_threshold, load_student
from distill.views import mean_over_views

SKIP_BAD_HINT = "--skip-bad leaves images that do not read out, lists them and goes on"
OUTPUT_FOLDERS = ("masks", "probs")  # under --out: the thresholded masks, the probabilities x 255


def checked_device(device: str) -> str:
    """`--device` resolved (`auto`) and checked before a checkpoint is loaded onto it: torch's own
    errors for a device this machine lacks name neither the flag nor the fix."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"--device {device}: not a device ({err}); give auto, cpu, cuda or cuda:N") from err
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {device}: CUDA is not available on this machine; use --device cpu (or auto)"
        )
    if kind.type == "cuda" and (kind.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return device


def load_predictor(
    model: Path, device: str = "auto", views: list[str] | None = None
) -> tuple[Callable[[np.ndarray], np.ndarray], float | None]:
    """A function HxWx3 uint8 -> HxW float32 probabilities, and the threshold chosen for it.

    `views`: average the logits over these test-time views. Refused for an ONNX model that has views
    folded in already (`export --views`).
    """
    views = list(views or [])
    if is_onnx(model):
        import onnxruntime as ort

        metadata = read_metadata(model)
        if views and metadata.get("views"):
            raise ConfigError(f"{model}: has the views {metadata['views']} folded in already; drop --views")
        session = ort.InferenceSession(str(model), providers=ort.get_available_providers())

        def forward(images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(["logits"], {"image": images.contiguous().numpy()})[0])

        threshold = chosen_threshold({"chosen_threshold": metadata.get("chosen_threshold")}, views)
    else:
        device = checked_device(device)
        student, info = load_student(model, map_location=device)
        student = student.to(device)
        threshold = chosen_threshold(info, views)

        def forward(images: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
                return student(images.to(device)).float()

    @torch.no_grad()
    def predict(image: np.ndarray) -> np.ndarray:
        images = torch.from_numpy(image).permute(2, 0, 1)[None]
        logits = mean_over_views(forward, images, views) if views else forward(images)
        return torch.sigmoid(logits)[0, 0].cpu().numpy()

    return predict, threshold


@dataclass
class Predicted:
    """What `predict_folder` did: how many images it wrote masks for, and the ones it left out
    because they did not read (`skip_bad`)."""

    written: int
    left_out: list[DatasetError]


def find_images(images: Path, out: Path) -> list[Path]:
    """The image files under `images`, sorted, leaving out the folders predict writes (`out/masks`,
    `out/probs`): with `--out` inside `--images`, a second run would read the first one's outputs."""
    if not images.is_dir():
        what = "is a file, not a folder" if images.exists() else "does not exist"
        raise ConfigError(f"{images}: {what}; --images takes a folder of images")
    written = [(out / sub).resolve() for sub in OUTPUT_FOLDERS]
    paths = sorted(
        path
        for path in images.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and not any(path.resolve().is_relative_to(folder) for folder in written)
    )
    if not paths:
        raise ConfigError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return paths


def output_names(paths: list[Path], images: Path) -> dict[Path, Path]:
    """Each image's output name under masks/ and probs/ (its path under `images`, as .png).

    Refuses, before anything is written, images that would share one (`x.png` and `x.jpg`): the
    second would silently overwrite the first one's mask."""
    by_name: dict[Path, list[Path]] = defaultdict(list)
    for path in paths:
        by_name[path.relative_to(images).with_suffix(".png")].append(path)
    shared = [
        " and ".join(map(str, sources)) + f" -> {name}"
        for name, sources in by_name.items()
        if len(sources) > 1
    ]
    if shared:
        raise ConfigError(
            f"{images}: images that would write the same mask: {'; '.join(shared)}; rename one of each"
        )
    return {sources[0]: name for name, sources in by_name.items()}


def predict_folder(
    model: Path,
    images: Path,
    out: Path,
    threshold: float | None = None,
    device: str = "auto",
    views: list[str] | None = None,
    bit_depth: int | None = None,
    skip_bad: bool = False,
) -> Predicted:
    """Write masks and probability maps for every image under `images`.

    `bit_depth`: the bits 16-bit grayscale images hold, as the reader option of the same name
    (default: detected per image). `skip_bad`: an image that does not read is left out (and listed)
    instead of stopping the run, as `cache_teacher --skip-bad` does; refused when none reads.
    """
    check_bit_depth(bit_depth)
    names = output_names(find_images(images, out), images)
    predict, chosen = load_predictor(model, device, views)
    threshold = threshold if threshold is not None else chosen
    if threshold is None:
        raise ConfigError(f"{model}: carries no chosen threshold; pass --threshold")
    left_out: list[DatasetError] = []
    for path, name in tqdm(names.items(), desc="predict", unit="img"):
        try:
            image = read_image(path, bit_depth=bit_depth)
        except DatasetError as err:
            if not skip_bad:
                raise with_skip_bad_hint(err) from None
            left_out.append(err)
            continue
        write_prediction(out, name, predict(image), threshold)
    if len(left_out) == len(names):
        raise ConfigError(f"{images}: none of the {len(names)} images could be read:\n{listing(left_out)}")
    return Predicted(len(names) - len(left_out), left_out)


def write_prediction(out: Path, name: Path, prob: np.ndarray, threshold: float) -> None:
    """`out/masks/<name>` (255 where prob >= threshold, the metrics' rule) and `out/probs/<name>`."""
    for sub, array in zip(OUTPUT_FOLDERS, ((prob >= threshold) * 255, np.round(prob * 255)), strict=True):
        target = out / sub / name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array.astype(np.uint8)).save(target)


def with_skip_bad_hint(err: DatasetError) -> DatasetError:
    """`err` with `--skip-bad` in its fix: the run stops at one image that does not read, and the user
    should not have to look up how to go on without it."""
    return DatasetError(err.path, err.problem, f"{err.fix}; {SKIP_BAD_HINT}" if err.fix else SKIP_BAD_HINT)


def listing(errors: list[DatasetError]) -> str:
    """One indented line per image left out, for the end of the run's output."""
    return "\n".join(f"  {err}" for err in errors)


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distill.predict",
        description="Segment a folder of images with a trained student (checkpoint or ONNX).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  python -m distill.predict --model students/demo/checkpoints/best.ckpt --images data/new --out predictions
  python -m distill.predict --model students/demo/student.onnx --images data/new --out predictions --threshold 0.4""",
    )
    parser.add_argument(
        "--model", type=Path, required=True, help="best.ckpt from distill.fit, or a .onnx export"
    )
    parser.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument(
        "--out", type=optional_path, default=None, help="output folder (masks/, probs/; default: predictions)"
    )
    parser.add_argument(
        "--threshold", type=probability, default=None, help="override the model's chosen threshold (0-1)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (checkpoints only)")
    parser.add_argument(
        "--bit-depth",
        type=int,
        default=None,
        help="bits 16-bit grayscale images hold, as the training data's bit_depth reader option "
        "(default: detected per image)",
    )
    parser.add_argument(
        "--views", type=views_flag, default=None, help="average over these test-time views (d4 = all 8)"
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave images that do not read out, list them at the end and go on (exit status 0 "
        "unless none reads); without it the first one stops the run",
    )
    args = parser.parse_args(argv)
    out = args.out or Path("predictions")
    done = predict_folder(
        args.model,
        args.images,
        out,
        args.threshold,
        args.device,
        args.views,
        args.bit_depth,
        args.skip_bad,
    )
    print(f"wrote {done.written} masks and probability maps to {out}/masks and {out}/probs")
    if done.left_out:
        print(f"left out {len(done.left_out)} unreadable image(s) (--skip-bad):\n{listing(done.left_out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
