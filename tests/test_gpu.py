"""CUDA-only paths (run on a GPU machine with `pytest -m gpu`; skipped elsewhere)."""

import pytest
import torch

from distill.data.prefetch import prefetch_to_device
from distill.data.sampling import EndlessBatches, EpochStream
from distill.fit import main as fit
from distill.losses import FiniteCheck

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_prefetched_batches_arrive_on_the_device_intact_and_in_order():
    device = torch.device("cuda", 0)
    batches = [
        {"image": torch.full((4, 3, 64, 64), i, dtype=torch.uint8).pin_memory(), "id": [f"b{i}"]}
        for i in range(5)
    ]
    seen = []
    for batch in prefetch_to_device(iter(batches), device):
        assert batch["image"].device == device
        # Work on the compute stream sees the finished copy (the event fence), never a partial one.
        seen.append((batch["id"][0], int(batch["image"].float().mean().item())))
        torch.cuda._sleep(1_000_000)  # keep the compute stream busy while the next copy runs
    assert seen == [(f"b{i}", i) for i in range(5)]


def test_the_epoch_stream_prefetches_across_epochs_on_cuda():
    batches = EndlessBatches(n=6, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(
        list(range(6)), batch_sampler=batches, pin_memory=True, collate_fn=lambda i: {"x": torch.tensor(i)}
    )
    stream = EpochStream(loader, batches.batches_per_pass, torch.device("cuda", 0))
    epochs = [[b["x"].cpu().tolist() for b in stream] for _ in range(2)]
    assert all(b["x"].is_cuda for b in stream)
    stream.close()
    expected = iter(EndlessBatches(n=6, batch_size=2, seed=0))
    assert epochs == [[next(expected) for _ in range(3)] for _ in range(2)]


def test_finite_check_names_a_nan_term_on_cuda():
    terms = {"gt_bce": torch.tensor(0.3, device="cuda"), "kd_bce": torch.tensor(float("nan"), device="cuda")}
    assert FiniteCheck(terms).first_nonfinite() == "kd_bce"
    assert FiniteCheck({"gt_bce": torch.ones((), device="cuda")}).first_nonfinite() is None


@pytest.mark.parametrize("config", ["unet_r34_kd", "segformer_b0_kd", "unet_r34_gt"])
def test_the_shipped_gpu_configs_train_and_report(config, tiny_data_and_cache, tmp_path):
    """Their trainer settings as shipped (bf16-mixed, gradient clipping, channels_last) on tiny data."""
    data, cache = tiny_data_and_cache
    reports = fit(
        [
            f"--config=configs/fit/{config}.yaml",
            f"--data.data_root={data}",
            f"--data.cache_dir={cache}",
            f"--runs_dir={tmp_path}",
            "--run_name=gpu",
            "--data.batch_size=4",
            "--data.num_workers=2",
            "--trainer.max_epochs=2",
            "--trainer.enable_progress_bar=false",
            "--wandb=false",
        ]
    )
    for split in ("val", "test"):
        assert reports[split]["n_images"] >= 1
        assert (tmp_path / "gpu" / f"metrics_{split}.json").is_file()
    assert (tmp_path / "gpu" / "checkpoints" / "best.ckpt").is_file()
