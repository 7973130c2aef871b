"""CUDA-only paths (run on a GPU machine with `pytest -m gpu`; skipped elsewhere)."""

import json
import subprocess
import sys
import time
from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch

import distill.data.device_augment as device_augment
from distill.data.augment import Augment, Preset, build_augment
from distill.data.device_augment import DeviceAugment, ResidentSplit
from distill.data.prefetch import prefetch_to_device
from distill.data.sampling import Draw, EndlessBatches, EpochStream
from distill.fit import main as fit
from distill.losses import FiniteCheck, stack_terms
from distill.module import DistillModule
from distill.students import StudentConfig
from tests.test_device_augment import check_aligned, probe_record
from tests.test_fit import three_image_eval_splits
from tests.test_ring import check_in_order, ring_stream

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


def test_ring_batches_reach_the_gpu_whole_and_in_order_from_pinned_shared_memory():
    device = torch.device("cuda", 0)
    stream = ring_stream(device)
    batches = iter(stream)
    first = next(batches)
    assert first["image"].device == device and stream.ring._pinned_at is not None  # registered after the fork
    batches.close()
    assert stream.ring._pinned_at is None
    # Work queued on the compute stream never delays a copy; batches still arrive as written.
    check_in_order(stream, 4 * stream.ring.slots, wait=lambda: torch.cuda._sleep(2_000_000))


def test_the_epoch_stream_prefetches_across_epochs_on_cuda():
    class Draws(torch.utils.data.Dataset):  # the sampler yields Draw(index, number) per sample
        def __len__(self):
            return 6

        def __getitem__(self, draw):
            return draw

    batches = EndlessBatches(n=6, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(
        Draws(),
        batch_sampler=batches,
        pin_memory=True,
        collate_fn=lambda draws: {"x": torch.tensor([d.index for d in draws])},
    )
    stream = EpochStream(loader, 3, torch.device("cuda", 0))
    epochs = [[b["x"].cpu().tolist() for b in stream] for _ in range(2)]
    assert all(b["x"].is_cuda for b in stream)
    stream.close()
    expected = iter(EndlessBatches(n=6, batch_size=2, seed=0))
    assert epochs == [[[d.index for d in next(expected)] for _ in range(3)] for _ in range(2)]


def test_finite_check_names_a_nan_term_on_cuda():
    terms = {"gt_bce": torch.tensor(0.3, device="cuda"), "kd_bce": torch.tensor(float("nan"), device="cuda")}
    assert FiniteCheck(*stack_terms(terms)).first_nonfinite() == "kd_bce"
    assert FiniteCheck(*stack_terms({"gt_bce": torch.ones((), device="cuda")})).first_nonfinite() is None


@pytest.mark.parametrize(
    "config", ["unet_r34_kd", "segformer_b0_kd", "unet_r34_gt", "small_data", "small_student_kd"]
)
def test_the_shipped_gpu_configs_train_and_report(config, tiny_data_and_cache, tmp_path):
    """Their trainer and augmentation settings as shipped (bf16-mixed, clipping, channels_last, batches made on the GPU) on tiny data."""
    data, cache = tiny_data_and_cache
    reports = fit(
        [
            f"--config=configs/fit/{config}.yaml",
            "--data.data_format=merged",
            "--data.crop_size=48",
            "--trainer.max_steps=6",
            f"--data.data_root={data}",
            f"--data.cache_dir={cache}",
            f"--runs_dir={tmp_path}",
            "--run_name=gpu",
            "--data.batch_size=4",
            "--data.num_workers=2",
            "--trainer.max_epochs=2",
            "--trainer.val_check_interval=3",
            "--trainer.check_val_every_n_epoch=null",
            "--trainer.enable_progress_bar=false",
            "--wandb=false",
        ]
    )
    for split in ("val", "test"):
        assert reports[split]["n_images"] >= 1
        assert (tmp_path / "gpu" / f"metrics_{split}.json").is_file()
    assert (tmp_path / "gpu" / "checkpoints" / "best.ckpt").is_file()


def test_reduce_overhead_replays_cuda_graphs_and_trains_as_eager(tmp_path):
    """model.compile="reduce-overhead": the step's graphs are CUDA graphs, and the losses are eager's."""
    from torch._dynamo.utils import counters

    from tests.test_module import TINY, RecordLosses, fake_batches, identity_loader, trainer

    losses = {}
    for compile in (False, "reduce-overhead"):
        torch.manual_seed(0)
        counters.clear()
        module = DistillModule(student=TINY, loss={"kd_alpha": 0.5}, compile=compile)
        record = RecordLosses()
        run = trainer(tmp_path / str(compile), accelerator="gpu", devices=1, max_steps=4, callbacks=[record])
        run.fit(module, identity_loader(fake_batches(4)), identity_loader(fake_batches(1, seed=1)))
        losses[compile] = torch.stack(record.losses).cpu()
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    # The first step sees the same weights: the same loss up to the order of sums. AdamW then scales
    # every gradient by its own running size, so rounding differences grow into whole updates of the
    # weights whose gradients are tiny: later steps agree to 1% (measured: 0.17% at step 4 on an H200).
    torch.testing.assert_close(losses["reduce-overhead"][0], losses[False][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["reduce-overhead"], losses[False], rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize(
    "settings", [{"compile": False}, {"compile": "reduce-overhead"}, {"compile": True, "cuda_graph": True}]
)
def test_steady_training_steps_never_wait_for_the_gpu(tmp_path, settings):
    """After the first steps, no training step makes a blocking host-device call (an .item(), a host
    number copied to the GPU): the host would wait for the GPU's whole queue, which then runs dry.
    Clipping, the finiteness check, the loss means and logging (here every step) included."""
    import lightning.pytorch as pl

    from distill.graphed_step import WARMUP_STEPS
    from tests.test_module import TINY, fake_batches, identity_loader, trainer

    # The first steps compile and record the graphs; model.cuda_graph's capture step synchronises once.
    first_checked = WARMUP_STEPS + 1 if settings.get("cuda_graph") else 3

    class BlockingCallsRaise(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step >= first_checked:
                torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.set_sync_debug_mode("default")

    module = DistillModule(student=TINY, loss={"kd_alpha": 0.5}, **settings)
    run = trainer(
        tmp_path, accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=8, gradient_clip_val=1.0,
        log_every_n_steps=1, logger=False, limit_val_batches=0, callbacks=[BlockingCallsRaise()],
    )  # fmt: skip
    try:
        run.fit(module, identity_loader(fake_batches(8)))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert run.global_step == 8


def test_a_graphed_step_trains_as_eager_clipped_and_on_schedule(tmp_path):
    """model.cuda_graph: after the eager warm-up every step is one replay, and the losses are eager's,
    with clipping biting (gradient_clip_val 0.01) and the warm-up/cosine rate moving every step."""
    import lightning.pytorch as pl

    from distill.graphed_step import WARMUP_STEPS
    from tests.test_module import TINY, fake_batches, identity_loader, trainer

    class Record(pl.Callback):
        def __init__(self):
            self.losses, self.graphed, self.lrs = [], [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(outputs["loss"].detach().clone())
            self.graphed.append(pl_module._step_in_graph)
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    runs = {}
    for cuda_graph in (False, True):
        torch.manual_seed(0)
        module = DistillModule(
            student=TINY, loss={"kd_alpha": 0.5}, warmup_fraction=0.25, cuda_graph=cuda_graph
        )
        record = Record()
        run = trainer(
            tmp_path / str(cuda_graph), accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=10,
            gradient_clip_val=0.01, limit_val_batches=0, callbacks=[record],
        )  # fmt: skip
        run.fit(module, identity_loader(fake_batches(10)))
        runs[cuda_graph] = record
        weights = {name: p.detach().clone() for name, p in module.named_parameters()}
        runs[cuda_graph].weights = weights
    eager, graphed = runs[False], runs[True]
    assert graphed.graphed == [False] * WARMUP_STEPS + [True] * (10 - WARMUP_STEPS) and not any(eager.graphed)
    assert graphed.lrs == eager.lrs and len(set(eager.lrs)) >= 8
    # Rounding differences grow through AdamW's per-weight scaling (see the reduce-overhead test).
    torch.testing.assert_close(torch.stack(graphed.losses), torch.stack(eager.losses), rtol=1e-2, atol=1e-4)
    for name, weight in graphed.weights.items():
        torch.testing.assert_close(weight, eager.weights[name], rtol=1e-2, atol=1e-3, msg=name)


def test_a_graphed_step_reads_the_rate_every_replay_and_refuses_another_shape():
    from distill.graphed_step import WARMUP_STEPS, GraphedStep

    weight = torch.nn.Parameter(torch.ones(4, device="cuda"))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)

    def update(batch):
        loss = (weight * batch["x"]).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    batch = {"x": torch.arange(4.0, device="cuda")}
    for _ in range(WARMUP_STEPS):
        update(batch)
    step = GraphedStep(update, [optimizer], batch)
    before = weight.detach().clone()
    assert step({"x": 2 * batch["x"]}).item() == pytest.approx(float((before * 2 * batch["x"]).sum()))
    assert not torch.equal(weight, before)
    optimizer.param_groups[0]["lr"] = 0.0  # as a scheduler sets it: a float
    before = weight.detach().clone()
    step(batch)
    assert torch.equal(weight, before) and isinstance(optimizer.param_groups[0]["lr"], float)
    with pytest.raises(ValueError, match=r"batch\['x'\] is \(5,\).*captured for \(4,\)"):
        step({"x": torch.ones(5, device="cuda")})
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(2, device="cuda"))]})
    with pytest.raises(ValueError, match="param groups changed after the step was captured"):
        step(batch)


@pytest.mark.parametrize("precision, fused", [("bf16-mixed", True), ("16-mixed", False)])
def test_cuda_training_steps_with_fused_adamw_unless_a_grad_scaler_and_clips(tmp_path, precision, fused):
    """Fused AdamW on CUDA, clipped by the module; with fp16's GradScaler the multi-tensor one."""
    from tests.test_module import TINY, ClippedGradNorm, fake_batches, identity_loader, trainer

    module = DistillModule(student=TINY, loss={"kd_alpha": 0.5})
    norms = ClippedGradNorm()
    run = trainer(
        tmp_path, accelerator="gpu", devices=1, precision=precision, max_steps=2, gradient_clip_val=1e-3,
        callbacks=[norms], limit_val_batches=0,
    )  # fmt: skip
    run.fit(module, identity_loader(fake_batches(2)))
    assert bool(run.optimizers[0].defaults["fused"]) is fused and len(norms.norms) == 2
    if fused:  # (fp16's first steps may overflow and be skipped: Lightning's clipping, not checked here)
        assert max(norms.norms) <= 1e-3 * 1.01


@pytest.mark.parametrize(
    "graphs",
    [
        ["--model.compile=reduce-overhead", "--model.cuda_graph=false"],
        ["--model.compile=true", "--model.cuda_graph=true", "--model.ema_decay=0.99"],
    ],
)
def test_a_shipped_config_trains_with_cuda_graphs_to_the_end(tiny_data_and_cache, tmp_path, graphs):
    """Validation, checkpoints and (whole-step graph) EMA swaps between replays: steps 3 (eager), 6 and 9
    (replayed) validate; then test on the best weights."""
    data, cache = tiny_data_and_cache
    reports = fit(
        [
            "--config=configs/fit/small_data.yaml",
            *graphs,
            "--data.data_format=merged",
            "--data.crop_size=48",
            "--data.batch_size=4",
            "--trainer.max_steps=9",
            "--trainer.val_check_interval=3",
            f"--data.data_root={data}",
            f"--data.cache_dir={cache}",
            f"--runs_dir={tmp_path}",
            "--run_name=graphs",
            "--wandb=false",
        ]
    )
    assert reports["test"]["n_images"] >= 1 and (tmp_path / "graphs" / "checkpoints" / "best.ckpt").is_file()


def test_device_batches_on_the_gpu_are_aligned_and_the_same_from_a_pinned_host_store(monkeypatch):
    record, teacher = probe_record()
    draws = [Draw(0, n) for n in range(16)]
    default = build_augment("default", crop_size=40)
    colourless = Augment(Preset(views=default.views, geometry=default.preset.geometry), crop_size=40)
    on_gpu = ResidentSplit([record], [teacher], device="cuda")
    assert on_gpu.images.is_cuda
    batch = DeviceAugment(colourless, "cuda")(on_gpu, draws, seed=0)
    assert batch["image"].is_cuda and batch["image"].is_contiguous(memory_format=torch.channels_last)
    check_aligned({key: value.cpu() if torch.is_tensor(value) else value for key, value in batch.items()})
    monkeypatch.setattr(device_augment, "RESIDENT_SHARE", 0.0)  # "does not fit": pinned host memory
    on_host = ResidentSplit([record], [teacher], device="cuda")
    assert not on_host.images.is_cuda and on_host.images.is_pinned()
    again = DeviceAugment(colourless, "cuda")(on_host, draws, seed=0)
    for key in ("image", "mask", "roi", "teacher"):
        assert again[key].is_cuda and torch.equal(again[key], batch[key]), key


def test_a_training_step_and_a_device_batch_never_wait_for_the_gpu():
    """Host syncs leave the GPU idle while the host catches up: none per step (torch's sync debug mode raises)."""
    record, teacher = probe_record()
    store = ResidentSplit([record], [teacher], device="cuda")
    augment = DeviceAugment(build_augment("default", crop_size=64), "cuda")
    module = DistillModule(
        student=StudentConfig(name="unet", encoder="resnet18"), loss={"kd_alpha": 0.5}
    ).cuda()
    optimizer = module.make_optimizer(fused=True)

    def step(n: int) -> None:
        batch = augment(store, [Draw(0, n + i) for i in range(8)], seed=0)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total, terms = module.loss(module(batch["image"]), batch["mask"], batch["roi"], batch["teacher"])
        total.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        FiniteCheck(*stack_terms(terms))

    step(0)  # first calls allocate, autotune and may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for n in range(1, 4):
            step(8 * n)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("cuda_graph", [True, False])
def test_ddp_fit_on_two_gpus_counts_every_image_once(tiny_data_and_cache, tmp_path, cuda_graph):
    """python -m distill.fit --trainer.devices=2 --trainer.strategy=ddp on NCCL, batches made on the GPUs;
    with the whole-step graph, steps 4-6 replay it, after validating at step 3."""
    data, cache = tiny_data_and_cache
    odd, splits = three_image_eval_splits(data, tmp_path)
    command = [
        sys.executable, "-m", "distill.fit", "--config=configs/fit/small_data.yaml",
        "--data.data_format=merged", f"--data.data_root={odd}", f"--data.cache_dir={cache}",
        f"--runs_dir={tmp_path}", "--run_name=ddp", "--wandb=false", "--trainer.devices=2",
        "--trainer.strategy=ddp", f"--model.cuda_graph={str(cuda_graph).lower()}", "--trainer.max_steps=6",
        "--trainer.val_check_interval=3",
        "--data.batch_size=2", "--data.crop_size=48", "--data.samples_per_epoch=8", "--ddp_timeout_s=120",
    ]  # fmt: skip
    subprocess.run(command, check=True, timeout=600)
    for split in ("val", "test"):
        metrics = json.loads((tmp_path / "ddp" / f"metrics_{split}.json").read_text())
        assert metrics["n_images"] == 3 and metrics["per_image_ids"] == sorted(
            i for i in splits if splits[i] == split
        )


class SaveEndState(pl.Callback):
    """Each rank's state dict, and which steps replayed the graph, saved to `directory`/RANK.pt at the end
    (the ranks of ddp_spawn are other processes)."""

    def __init__(self, directory):
        self.directory, self.graphed = directory, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.graphed.append(pl_module._step_in_graph)

    def on_train_end(self, trainer, pl_module):
        state = {name: value.detach().cpu() for name, value in pl_module.state_dict().items()}
        torch.save({"state": state, "graphed": self.graphed}, self.directory / f"{trainer.global_rank}.pt")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_graphed_ddp_steps_average_gradients_and_share_buffers(tmp_path):
    """Under DDP the replays all-reduce the gradients and broadcast the BatchNorm statistics themselves:
    both ranks (different batches) end with one set of weights and buffers, and the weights are eager
    DDP's."""
    from distill.graphed_step import WARMUP_STEPS
    from tests.test_module import TINY, fake_batches, identity_loader, trainer

    for cuda_graph in (False, True):
        torch.manual_seed(0)
        module = DistillModule(student=TINY, loss={"kd_alpha": 0.5}, cuda_graph=cuda_graph)
        directory = tmp_path / str(cuda_graph)
        directory.mkdir()
        run = trainer(
            directory, accelerator="gpu", devices=2, strategy="ddp_spawn", precision="bf16-mixed", max_steps=8,
            gradient_clip_val=0.01, limit_val_batches=0, callbacks=[SaveEndState(directory)],
        )  # fmt: skip
        run.fit(module, identity_loader(fake_batches(16)))  # 8 batches per rank
    eager, graphed = (
        [torch.load(tmp_path / str(g) / f"{rank}.pt") for rank in (0, 1)] for g in (False, True)
    )
    assert graphed[0]["graphed"] == [False] * WARMUP_STEPS + [True] * (8 - WARMUP_STEPS)
    parameters = dict(module.named_parameters())
    for name, value in graphed[0]["state"].items():
        assert torch.equal(value, graphed[1]["state"][name]), name
        if name in parameters:
            torch.testing.assert_close(value, eager[0]["state"][name], rtol=1e-2, atol=1e-3, msg=name)
    running = [name for name in graphed[0]["state"] if name.endswith("running_mean")]
    assert running and any(not torch.equal(eager[0]["state"][n], eager[1]["state"][n]) for n in running)


class StopRank1(pl.Callback):
    """Rank 1 stops (sleeps) before step 5: its replays so far finished; rank 0's next one waits for it."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 5:
            time.sleep(600)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_replay_waiting_for_a_stopped_rank_ends_its_process_after_the_timeout(tmp_path, capfd):
    """NCCL's watchdog does not see the graph's all-reduce: ReplayWatchdog ends rank 0 after DDP's timeout."""
    from lightning.pytorch.strategies import DDPStrategy

    from tests.test_module import TINY, fake_batches, identity_loader, trainer

    module = DistillModule(student=TINY, loss={"kd_alpha": 0.5}, cuda_graph=True)
    strategy = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=20))
    run = trainer(
        tmp_path, accelerator="gpu", devices=2, strategy=strategy, precision="bf16-mixed", max_steps=8,
        limit_val_batches=0, callbacks=[StopRank1()],
    )  # fmt: skip
    start = time.monotonic()
    with pytest.raises(Exception, match="process 0 terminated with exit code 1"):
        run.fit(module, identity_loader(fake_batches(16)))
    assert time.monotonic() - start < 300
    err = capfd.readouterr().err
    assert "rank 0: the update of global step 5 (a CUDA graph replay" in err and "after 20 s" in err, err[
        -2000:
    ]
