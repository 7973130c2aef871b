"""The frangi and checkpoint teachers: calibration, fingerprints, ensembles and test-time views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.data import open_dataset
from distill.synth import make_dataset
from distill.teachers import create_teacher
from distill.teachers.frangi import fit_logistic_1d
from distill.views import apply_view, invert_view
from tests._slow_teacher import save_tiny_student


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("synth") / "d", count=10, size=96, style="fundus", seed=3)
    return open_dataset("merged", root)


def records(dataset, split):
    return [dataset.get(i) for i in dataset.split_ids(split)]


def test_logistic_fit_recovers_known_parameters():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200_000)
    y = rng.random(x.size) < 1 / (1 + np.exp(-(2.0 * x - 1.0)))
    slope, intercept = fit_logistic_1d(x, y)
    assert slope == pytest.approx(2.0, abs=0.05)
    assert intercept == pytest.approx(-1.0, abs=0.05)
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic_1d(x, np.zeros_like(x))


def best_dice(probs: np.ndarray, target: np.ndarray) -> float:
    return max(
        2 * np.sum((probs > t) & target) / (np.sum(probs > t) + np.sum(target))
        for t in np.linspace(0.05, 0.95, 19)
    )


def test_frangi_is_calibrated_on_vessels(dataset):
    teacher = create_teacher("frangi", sigmas=[1, 2, 3])
    with pytest.raises(RuntimeError, match="not fitted"):
        teacher.predict_logits([dataset[0].image])
    train = records(dataset, "train")
    teacher.fit([r.image for r in train], [r.mask for r in train])
    fingerprint = teacher.fingerprint()
    assert fingerprint["fit"]["slope"] == teacher.slope and fingerprint["sigmas"] == [1.0, 2.0, 3.0]

    held_out = records(dataset, "val") + records(dataset, "test")
    logits = teacher.predict_logits([r.image for r in held_out])
    assert all(
        lg.dtype == np.float32 and lg.shape == r.mask.shape for lg, r in zip(logits, held_out, strict=True)
    )
    probs = 1 / (1 + np.exp(-np.stack(logits)))
    target = np.stack([r.mask for r in held_out]).astype(bool)
    assert np.isfinite(probs).all()
    assert probs[target].mean() > 2 * probs[~target].mean()
    # Calibrated-ish: the mean probability is close to the vessel fraction (a fit, not a raw score).
    assert abs(probs.mean() - target.mean()) < 0.05
    # Frangi alone on synthetic fundus images reaches Dice ~0.5 at its best threshold.
    assert best_dice(probs, target) > 0.35


def test_checkpoint_teacher_ensemble_and_tta(tmp_path):
    models = [save_tiny_student(tmp_path / f"m{i}.ckpt", seed=i) for i in range(2)]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(3)]

    def reference(image, view):
        x = torch.from_numpy(apply_view(image, view)).permute(2, 0, 1)[None]
        with torch.no_grad():
            mean = sum(m(x)[0, 0] for m in models) / 2
        return invert_view(mean.numpy(), view)

    teacher = create_teacher(
        "checkpoint",
        checkpoints=[str(tmp_path / "m0.ckpt"), str(tmp_path / "m1.ckpt")],
        tta=["identity", "rot90"],
        batch_size=2,
    )
    got = teacher.predict_logits(images)
    for image, logits in zip(images, got, strict=True):
        expected = (reference(image, "identity") + reference(image, "rot90")) / 2
        assert logits.shape == image.shape[:2]
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    fingerprint = teacher.fingerprint()
    assert len(fingerprint["checkpoints_sha256"]) == 2 and fingerprint["tta"] == ["identity", "rot90"]
    assert fingerprint["dtype"] == "float32"  # CPU; bfloat16 on CUDA
    single = create_teacher("checkpoint", checkpoints=str(tmp_path / "m0.ckpt"))
    assert single.fingerprint()["checkpoints_sha256"] != fingerprint["checkpoints_sha256"]
