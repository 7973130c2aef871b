"""Threshold curves against brute force, threshold choice, per-image Dice, and a 2-process DDP sync."""

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from distill.metrics import (
    DEFAULT_THRESHOLDS,
    PerImageDice,
    ThresholdCurves,
    choose_threshold,
    curves_at,
    curves_to_json,
    per_image_means,
)


def _data(seed, n_batches=3, shape=(2, 1, 24, 24)):
    g = torch.Generator().manual_seed(seed)
    probs, target, roi = [], [], []
    for _ in range(n_batches):
        p = torch.rand(shape, generator=g)
        p[0, 0, 0, :4] = torch.tensor([0.05, 0.5, 0.95, 1.0])  # exactly on thresholds
        probs.append(p.half() if len(probs) == 1 else p)  # float16 is accepted too
        target.append((torch.rand(shape, generator=g) < 0.3 + 0.4 * p).to(torch.uint8))
        roi.append((torch.rand(shape, generator=g) > 0.25).to(torch.uint8))
    return {"probs": probs, "target": target, "roi": roi}


def _brute_force_counts(data, thresholds, use_roi=True):
    probs = np.concatenate([p.float().numpy().ravel() for p in data["probs"]])
    target = np.concatenate([t.numpy().ravel() for t in data["target"]]).astype(bool)
    keep = np.concatenate([r.numpy().ravel() for r in data["roi"]]).astype(bool)
    if not use_roi:
        keep[:] = True
    counts = {"tp": [], "fp": [], "fn": []}
    for t in thresholds:
        predicted = probs >= np.float32(t)
        counts["tp"].append(int((predicted & target & keep).sum()))
        counts["fp"].append(int((predicted & ~target & keep).sum()))
        counts["fn"].append(int((~predicted & target & keep).sum()))
    return {k: np.array(v) for k, v in counts.items()}


def _curves(data, use_roi=True, **kwargs):
    metric = ThresholdCurves(**kwargs)
    for p, t, r in zip(data["probs"], data["target"], data["roi"], strict=True):
        metric.update(p, t, r if use_roi else None)
    return metric


def test_default_thresholds():
    assert len(DEFAULT_THRESHOLDS) == 19
    assert DEFAULT_THRESHOLDS[0] == 0.05 and DEFAULT_THRESHOLDS[9] == 0.5 and DEFAULT_THRESHOLDS[-1] == 0.95
    assert all(type(t) is float and t == round(t, 2) for t in DEFAULT_THRESHOLDS)


@pytest.mark.parametrize("use_roi", [True, False])
def test_counts_and_curves_match_brute_force_at_every_threshold(use_roi):
    data = _data(seed=0)
    metric = _curves(data, use_roi)
    expected = _brute_force_counts(data, DEFAULT_THRESHOLDS, use_roi)
    for name in ("tp", "fp", "fn"):
        assert getattr(metric, name).dtype == torch.int64
        np.testing.assert_array_equal(getattr(metric, name).numpy(), expected[name])

    tp, fp, fn = (expected[k].astype(np.float64) for k in ("tp", "fp", "fn"))
    curves = metric.compute()
    assert curves["thresholds"].tolist() == list(DEFAULT_THRESHOLDS)
    np.testing.assert_allclose(curves["dice"].numpy(), 2 * tp / (2 * tp + fp + fn), rtol=1e-12)
    np.testing.assert_allclose(curves["recall"].numpy(), tp / (tp + fn), rtol=1e-12)
    np.testing.assert_allclose(curves["precision"].numpy(), tp / (tp + fp), rtol=1e-12)
    np.testing.assert_allclose(curves["iou"].numpy(), tp / (tp + fp + fn), rtol=1e-12)


def test_custom_thresholds_and_pixels_outside_roi_do_not_count():
    data = _data(seed=1)
    thresholds = [0.0, 0.33, 0.5, 0.77, 1.0]
    metric = _curves(data, thresholds=thresholds)
    expected = _brute_force_counts(data, thresholds)
    np.testing.assert_array_equal(metric.tp.numpy(), expected["tp"])
    np.testing.assert_array_equal(metric.fp.numpy(), expected["fp"])

    flipped = {
        "probs": [
            torch.where(r > 0, p.float(), 1 - p.float())
            for p, r in zip(data["probs"], data["roi"], strict=True)
        ],
        "target": [torch.where(r > 0, t, 1 - t) for t, r in zip(data["target"], data["roi"], strict=True)],
        "roi": data["roi"],
    }
    other = _curves(flipped, thresholds=thresholds)
    for name in ("tp", "fp", "fn"):
        assert torch.equal(getattr(other, name), getattr(metric, name))


def test_empty_cases():
    metric = ThresholdCurves(thresholds=[0.5])
    metric.update(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    curves = metric.compute()
    assert {k: curves[k].item() for k in ("dice", "recall", "precision", "iou")} == {
        "dice": 1.0,
        "recall": 1.0,
        "precision": 1.0,
        "iou": 1.0,
    }
    metric.update(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4))  # vessels, nothing predicted
    curves = metric.compute()
    assert curves["dice"].item() == 0.0 and curves["recall"].item() == 0.0
    assert curves["precision"].item() == 1.0  # no false positives were made


def test_bad_inputs_raise():
    metric = ThresholdCurves()
    with pytest.raises(ValueError, match="apply sigmoid"):
        metric.update(torch.full((1, 1, 2, 2), 3.0), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="target must be 0/1"):
        metric.update(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 255, dtype=torch.uint8))
    with pytest.raises(ValueError, match="one shape"):
        metric.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="strictly increasing"):
        ThresholdCurves(thresholds=[0.5, 0.3])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        ThresholdCurves(thresholds=[0.5, 1.5])


def _fake_curves(dice, recall):
    n = len(dice)
    return {
        "thresholds": torch.linspace(0.1, 0.1 * n, n, dtype=torch.float64),
        "dice": torch.tensor(dice, dtype=torch.float64),
        "recall": torch.tensor(recall, dtype=torch.float64),
    }


def test_choose_threshold_max_dice_prefers_the_lower_threshold_on_ties():
    curves = _fake_curves([0.5, 0.8, 0.7, 0.8, 0.6], [0.99, 0.9, 0.86, 0.8, 0.5])
    index, threshold = choose_threshold(curves, "max_dice")
    assert (index, threshold) == (1, pytest.approx(0.2))
    assert not choose_threshold(curves).fell_back


def test_choose_threshold_recall_target_takes_the_highest_threshold_still_reaching_it():
    curves = _fake_curves([0.5, 0.8, 0.7, 0.8, 0.6], [0.99, 0.9, 0.85, 0.8, 0.5])
    choice = choose_threshold(curves, "recall_target", recall_target=0.85)
    assert tuple(choice) == (2, pytest.approx(0.3))
    assert choice.rule == "recall_target" and not choice.fell_back


def test_choose_threshold_recall_target_falls_back_to_max_recall():
    curves = _fake_curves([0.5, 0.8, 0.7], [0.7, 0.7, 0.6])
    choice = choose_threshold(curves, "recall_target", recall_target=0.85)
    assert tuple(choice) == (0, pytest.approx(0.1))
    assert choice.fell_back
    with pytest.raises(ValueError, match="rule"):
        choose_threshold(curves, "best")


def test_per_image_dice_and_json_export():
    probs = torch.tensor([[0.9, 0.6, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]]).reshape(
        3, 1, 2, 2
    )
    target = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.uint8).reshape(3, 1, 2, 2)
    roi = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 1, 1]], dtype=torch.uint8).reshape(3, 1, 2, 2)
    metric = PerImageDice(thresholds=[0.5])
    metric.update(probs, target, roi)
    per_image = metric.compute()
    # image 0: tp 1, fp 1, fn 1 -> 2/4; image 1: empty and empty -> 1; image 2: the miss is outside roi -> 1
    assert per_image["dice"].reshape(-1).tolist() == [0.5, 1.0, 1.0]
    assert per_image["has_vessels"].tolist() == [True, False, True]

    metric = ThresholdCurves(thresholds=[0.25, 0.5])
    metric.update(probs, target, roi)
    curves = metric.compute()
    exported = curves_to_json(curves)
    assert set(exported) == {"thresholds", "dice", "recall", "precision", "iou"}
    assert exported["thresholds"] == [0.25, 0.5]
    assert all(type(v) is float for values in exported.values() for v in values)
    assert exported["dice"][1] == round(2 * 2 / (2 * 2 + 1 + 1), 6)
    assert curves_at(curves, 1) == {k: exported[k][1] for k in ("dice", "recall", "precision", "iou")}


def test_per_image_dice_equals_pooled_curves_of_each_image_alone():
    """PerImageDice and ThresholdCurves share one binning: per image, they agree at every threshold."""
    data = _data(seed=5, n_batches=2)
    per_image = PerImageDice()
    for p, t, r in zip(data["probs"], data["target"], data["roi"], strict=True):
        per_image.update(p, t, r)
    rows = per_image.compute()["dice"]
    images = [
        (p[i : i + 1], t[i : i + 1], r[i : i + 1])
        for p, t, r in zip(*data.values(), strict=True)
        for i in range(2)
    ]
    for row, (p, t, r) in zip(rows, images, strict=True):
        alone = ThresholdCurves()
        alone.update(p, t, r)
        torch.testing.assert_close(row, alone.compute()["dice"].float())


def test_an_empty_prediction_cannot_win_the_per_image_mean():
    """Three vessel-free images and one with vessels: predicting nothing scores 1 on each vessel-free
    image, so a mean over every image would prefer it (0.75) to a model that finds the vessel and
    raises one false alarm per vessel-free image (0.25); the headline mean counts images with vessels."""
    target = torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    target[0, 0, 1, :] = 1
    nothing = torch.zeros(4, 1, 4, 4)
    finds_it = target.float().clone()
    finds_it[1:, 0, 0, 0] = 1.0  # a false alarm on each vessel-free image
    means = {}
    for name, probs in (("nothing", nothing), ("finds_it", finds_it)):
        metric = PerImageDice(thresholds=[0.5])
        metric.update(probs, target)
        per_image = metric.compute()
        means[name] = per_image_means(
            per_image["dice"].reshape(-1).tolist(), per_image["has_vessels"].tolist()
        )
    assert means["nothing"] == {"with_vessels": 0.0, "all": 0.75, "n_with_vessels": 1}
    assert means["finds_it"] == {"with_vessels": 1.0, "all": 0.25, "n_with_vessels": 1}
    assert per_image_means([1.0], [False]) == {"with_vessels": None, "all": 1.0, "n_with_vessels": 0}


def test_ddp_two_processes_equal_one_process_on_all_data(tmp_path):
    from _ddp_metrics_worker import run
    from _distributed import free_port

    data = _data(seed=2, n_batches=5)
    mp.spawn(run, args=(2, free_port(), data, str(tmp_path)), nprocs=2, join=True)
    single = _curves(data)
    expected = single.compute()
    for rank in range(2):
        synced = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, values in expected.items():
            assert torch.equal(synced["curves"][name], values), name
    # each rank's local (unsynced) state holds only its half: the sync did real work
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["tp"] for r in range(2)]
    assert torch.equal(ranks[0] + ranks[1], single.tp)
    assert not torch.equal(ranks[0], single.tp)
