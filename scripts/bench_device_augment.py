"""Where does the GPU data path (`data.augment_on: device`) spend its time? Each stage and transform alone.

For each regime (crop x batch) and preset it builds the resident train split on the device (synthetic
512x512 images, a one-channel teacher map) and times, with CUDA events (device time) and the host clock:

  batch            the whole `DeviceAugment` call, as training runs it
  <transform>      each kornia transform of the preset alone, at p=1, on the tensor it sees in training
                   (spatial: image+teacher [B,4,W,W] and mask+roi; colour: image [B,3,C,C] in [0, 1])

Each figure is the median over --repeats timed calls after --warmup calls. Results go to
<out>/device_augment_<gpu>.json.

    python scripts/bench_device_augment.py                    # 256x16 and 512x32, default preset
    python scripts/bench_device_augment.py --tiny             # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import kornia  # noqa: E402
import kornia.augmentation as K  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from distill.data.augment import build_augment  # noqa: E402
from distill.data.device_augment import DeviceAugment, ResidentSplit  # noqa: E402
from distill.data.record import Record  # noqa: E402
from distill.data.sampling import Draw  # noqa: E402


def synthetic_records(n: int, size: int) -> list[Record]:
    rng = np.random.default_rng(0)
    return [
        Record(
            id=f"im{i:04d}",
            image=rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            mask=(rng.random((size, size)) < 0.1).astype(np.uint8),
            source=Path(f"im{i:04d}.png"),
        )
        for i in range(n)
    ]


def timed(call, warmup: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Median device ms (CUDA events; None on CPU) and host ms of `call()`."""
    for _ in range(warmup):
        call()
    device_ms, host_ms = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        began = time.perf_counter()
        call()
        host_ms.append(1000 * (time.perf_counter() - began))
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize(device)
            device_ms.append(start.elapsed_time(end))
    return {
        "device_ms": statistics.median(device_ms) if device_ms else None,
        "host_ms": statistics.median(host_ms),
    }


def always(module: torch.nn.Module) -> torch.nn.Module:
    """`module` applied to every sample (p=1), for its cost per application."""
    module.p = 1.0
    return module


def bench_regime(
    preset: str, crop: int, batch: int, images: int, args: argparse.Namespace, device: torch.device
) -> dict:
    augment = build_augment(preset, crop)
    store = ResidentSplit(
        synthetic_records(images, args.image_size),
        teacher=[np.zeros((args.image_size, args.image_size), np.float16)] * images,
        device=device,
    )
    maker = DeviceAugment(augment, device)
    draws = [Draw(index=i % images, number=i) for i in range(batch)]
    result = {"preset": preset, "crop": crop, "batch": batch, "window": maker.window}
    result["batch_call"] = timed(lambda: maker(store, draws, args.seed), args.warmup, args.repeats, device)
    if maker.colour is not None:  # the marginal cost of each colour transform at its own probability
        colour = list(maker.colour.children())
        for module in colour:
            maker.colour = K.ImageSequential(*[m for m in colour if m is not module])
            result[f"batch_call_without_{type(module).__name__}"] = timed(
                lambda: maker(store, draws, args.seed), args.warmup, args.repeats, device
            )
        maker.colour = K.ImageSequential(*colour)

    window, side = maker.window, crop
    x = torch.rand(batch, 4, window, window, device=device)
    planes = (torch.rand(batch, 2, window, window, device=device) > 0.5).float()
    image = torch.rand(batch, 3, side, side, device=device)
    transforms = {}
    for spec in augment.preset.geometry:
        module = always(spec.kornia(crop, window)).to(device)
        sequential = K.AugmentationSequential(
            module, data_keys=["input", "mask"], extra_args={"mask": {"resample": "nearest"}}
        )
        transforms[type(module).__name__] = timed(
            lambda sequential=sequential: sequential(x, planes), args.warmup, args.repeats, device
        )
    colour = augment.preset.colour.kornia() if augment.preset.colour is not None else []
    for module in colour:
        module = always(module).to(device)
        transforms[type(module).__name__] = timed(
            lambda module=module: module(image), args.warmup, args.repeats, device
        )
    result["transforms_p1"] = transforms
    result["candidates_p1"] = {
        name: timed(lambda call=call: call(image), args.warmup, args.repeats, device)
        for name, call in candidates(device).items()
    }
    return result


def candidates(device: torch.device) -> dict:
    """Other formulations of the costliest colour transforms, each at p=1 on an RGB batch in [0, 1]."""
    from kornia.color import lab_to_rgb, rgb_to_lab
    from kornia.enhance import equalize_clahe

    def clahe_on_lightness(image: torch.Tensor) -> torch.Tensor:  # what albumentations does to RGB
        lab = rgb_to_lab(image)
        lightness = equalize_clahe(lab[:, :1] / 100, clip_limit=2.0, grid_size=(8, 8)) * 100
        return lab_to_rgb(torch.cat([lightness, lab[:, 1:]], dim=1)).clamp(0, 1)

    hue_then_saturation = K.ImageSequential(
        K.RandomHue(hue=(-5 / 180, 5 / 180), p=1.0),
        K.RandomSaturation(saturation=(1 - 10 / 255, 1 + 10 / 255), p=1.0),
    ).to(device)
    return {"clahe_on_lightness": clahe_on_lightness, "RandomHue+RandomSaturation": hue_then_saturation}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--regimes", nargs="+", default=["256x16", "512x32"], help="CROPxBATCH")
    parser.add_argument("--presets", nargs="+", default=["default"])
    parser.add_argument("--images", type=int, default=64, help="images held in the resident split")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: 64 px images, 32x4, 2 repeats")
    args = parser.parse_args(argv)
    if args.tiny:
        args.regimes, args.images, args.image_size, args.warmup, args.repeats = ["32x4"], 4, 64, 1, 2
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {
        "device": gpu,
        "torch": torch.__version__,
        "kornia": kornia.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(["python3", *sys.argv]),
        "results": [],
    }
    for preset in args.presets:
        for regime in args.regimes:
            crop, batch = (int(v) for v in regime.split("x"))
            entry = bench_regime(preset, crop, batch, args.images, args, device)
            report["results"].append(entry)
            print(json.dumps(entry), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()
    path = args.out / f"device_augment_{name}{'_tiny' if args.tiny else ''}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
