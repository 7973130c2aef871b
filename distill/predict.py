"""Segment a folder of images: `python -m distill.predict --model best.ckpt|student.onnx --images DIR`.

For each image it writes `<out>/masks/<name>.png` (255 where prob >= the model's chosen threshold,
or `--threshold`; the rule the metrics use) and `<out>/probs/<name>.png` (probability x 255). The
threshold comes from the checkpoint or the ONNX metadata: the one chosen on validation, so the masks
are the ones the evaluation measured. Images are the files the dataset readers take
(`distill.data.images.IMAGE_SUFFIXES`), decoded the same way (EXIF orientation applied).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from distill.cli import reports_user_errors
from distill.data.images import IMAGE_SUFFIXES, check_bit_depth, read_image
from distill.errors import ConfigError


def load_predictor(
    model: Path, device: str = "auto"
) -> tuple[Callable[[np.ndarray], np.ndarray], float | None]:
    """A function HxWx3 uint8 -> HxW float32 probabilities, and the model's chosen threshold."""
    if model.suffix == ".onnx":
        import onnxruntime as ort

        from distill.export import read_metadata

        session = ort.InferenceSession(str(model), providers=ort.get_available_providers())

        def run_onnx(image: np.ndarray) -> np.ndarray:
            logits = session.run(["logits"], {"image": image.transpose(2, 0, 1)[None].copy()})[0][0, 0]
            return 1.0 / (1.0 + np.exp(-logits))

        return run_onnx, read_metadata(model).get("chosen_threshold")

    from distill.students import load_student

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    student, info = load_student(model, map_location=device)
    student = student.to(device)

    @torch.no_grad()
    def run_torch(image: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(image).permute(2, 0, 1)[None].to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
            logits = student(batch)
        return torch.sigmoid(logits.float())[0, 0].cpu().numpy()

    return run_torch, info.get("chosen_threshold")


def predict_folder(
    model: Path,
    images: Path,
    out: Path,
    threshold: float | None = None,
    device: str = "auto",
    bit_depth: int | None = None,
) -> int:
    """Write masks and probability maps for every image under `images`; returns how many.

    `bit_depth`: the bits 16-bit grayscale images hold, as the reader option of the same name
    (default: detected per image).
    """
    check_bit_depth(bit_depth)
    paths = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ConfigError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    predict, chosen = load_predictor(model, device)
    threshold = threshold if threshold is not None else chosen
    if threshold is None:
        raise ConfigError(f"{model}: carries no chosen threshold; pass --threshold")
    for path in tqdm(paths, desc="predict", unit="img"):
        prob = predict(read_image(path, bit_depth=bit_depth))
        name = path.relative_to(images).with_suffix(".png")
        for sub, array in (("masks", (prob >= threshold) * 255), ("probs", np.round(prob * 255))):
            target = out / sub / name
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array.astype(np.uint8)).save(target)
    return len(paths)


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
        "--out", type=Path, default=Path("predictions"), help="output folder (masks/, probs/)"
    )
    parser.add_argument("--threshold", type=float, default=None, help="override the model's chosen threshold")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (checkpoints only)")
    parser.add_argument(
        "--bit-depth",
        type=int,
        default=None,
        help="bits 16-bit grayscale images hold, as the training data's bit_depth reader option "
        "(default: detected per image)",
    )
    args = parser.parse_args(argv)
    n = predict_folder(args.model, args.images, args.out, args.threshold, args.device, args.bit_depth)
    print(f"wrote {n} masks and probability maps to {args.out}/masks and {args.out}/probs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
