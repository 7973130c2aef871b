"""DistillModule: a training step on fake batches, each loss term logged, NaN stops with step and term."""

import csv
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from distill.errors import ConfigError
from distill.metrics import PerImageDice
from distill.module import DistillModule
from distill.students import StudentConfig

TINY = StudentConfig(
    name="unet", encoder="resnet18", extra={"encoder_depth": 3, "decoder_channels": [16, 8, 4]}
)


def fake_batches(n=4, size=32, teacher=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n):
        mask = (torch.rand(2, 1, size, size, generator=g) > 0.8).to(torch.uint8)
        batch = {
            "image": torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=g),
            "mask": mask,
            "roi": torch.ones_like(mask),
            "id": [f"img{i}a", f"img{i}b"],
        }
        if teacher:
            batch["teacher"] = (4 * mask.float() - 2 + torch.randn(2, 1, size, size, generator=g)).half()
        batches.append(batch)
    return batches


def trainer(tmp_path, **kwargs):
    options = dict(
        default_root_dir=tmp_path,
        max_epochs=1,
        accelerator="cpu",
        logger=pl.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**options, **kwargs})


def identity_loader(batches):
    return DataLoader(batches, batch_size=None)


class RecordLosses(pl.Callback):
    """The total loss of every training step."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


def test_training_step_logs_every_term_and_validation_scores_both(tmp_path):
    module = DistillModule(student=TINY, loss={"kd_alpha": 0.5}, thresholds=[0.25, 0.5, 0.75])
    run = trainer(tmp_path)
    run.fit(module, identity_loader(fake_batches()), identity_loader(fake_batches(2, seed=1)))
    logged = run.logged_metrics
    for term in ("gt_bce", "gt_dice", "kd_bce", "kd_dice", "total"):
        assert f"train/loss/{term}_epoch" in logged
    assert {"val/student/dice@best", "val/teacher/dice@best", "val/student/recall@0.50"} <= set(logged)
    report = module.results["val"]
    assert report["n_images"] == 4 and len(report["teacher"]["dice"]) == 3
    assert module.chosen_threshold in (0.25, 0.5, 0.75)
    # The teacher logits are 4*mask-2 plus noise: better than chance, and scored on the same images.
    assert report["at_chosen"]["teacher"]["dice"] > 0.5


def test_per_image_dice_is_logged_over_images_with_vessels_beside_the_mean_over_all(tmp_path):
    module = DistillModule(student=TINY, loss={"kd_alpha": 0.5}, thresholds=[0.25, 0.5, 0.75])
    val = fake_batches(2, seed=1)
    val[0]["mask"][0] = 0  # an image without vessels
    run = trainer(tmp_path, max_steps=1)
    run.fit(module, identity_loader(fake_batches(1)), identity_loader(val))
    report = module.results["val"]
    assert report["per_image_has_vessels"] == [False, True, True, True]
    for who in ("student", "teacher"):
        dice = report["per_image_dice"][who]
        means = report["per_image_dice_mean"][who]
        assert means["with_vessels"] == pytest.approx(sum(dice[1:]) / 3, abs=1e-6)
        assert means["all"] == pytest.approx(sum(dice) / 4, abs=1e-6)
        assert means["n_with_vessels"] == 3
        logged = run.logged_metrics
        assert logged[f"val/{who}/dice_per_image@best"].item() == pytest.approx(means["with_vessels"])
        assert logged[f"val/{who}/dice_per_image_all@best"].item() == pytest.approx(means["all"])


def test_step_losses_logged_at_log_steps_and_epoch_losses_are_the_batch_weighted_mean(tmp_path):
    module = DistillModule(student=TINY, loss={"kd_alpha": 0.5})
    seen = []  # every step's terms, as the loss returned them
    loss = module.loss.forward

    def recording_loss(*args, **kwargs):
        total, terms = loss(*args, **kwargs)
        seen.append({name: value.item() for name, value in terms.items()})
        return total, terms

    module.loss.forward = recording_loss
    batches = fake_batches(5)
    batches[4] = {k: v[:1] for k, v in batches[4].items()}  # a smaller last batch weighs less
    run = trainer(tmp_path, log_every_n_steps=2, max_epochs=2)
    run.fit(module, identity_loader(batches))
    rows = list(csv.DictReader((Path(run.logger.log_dir) / "metrics.csv").read_text().splitlines()))
    step_rows = [r for r in rows if r["train/loss/total_step"]]
    assert [int(r["step"]) for r in step_rows] == [1, 3, 5, 7, 9]  # (global step + 1) % 2 == 0
    for row in step_rows:
        assert float(row["train/loss/total_step"]) == pytest.approx(seen[int(row["step"])]["total"], rel=1e-5)
        assert float(row["train/lr"]) > 0
    epoch_rows = [r for r in rows if r["train/loss/kd_bce_epoch"]]
    assert len(epoch_rows) == 2
    weights = [2, 2, 2, 2, 1]
    for epoch, row in enumerate(epoch_rows):
        steps = seen[5 * epoch : 5 * epoch + 5]
        for term in ("total", "gt_bce", "kd_bce"):
            expected = sum(w * s[term] for w, s in zip(weights, steps, strict=True)) / sum(weights)
            assert float(row[f"train/loss/{term}_epoch"]) == pytest.approx(expected, rel=1e-5)


def test_nan_loss_names_step_and_term(tmp_path):
    batches = fake_batches(3)
    batches[2]["teacher"][0, 0, 0, 0] = float("nan")
    module = DistillModule(student=TINY, loss={"kd_alpha": 0.5})
    with pytest.raises(FloatingPointError, match=r"'kd_bce'.*global step 2"):
        trainer(tmp_path).fit(module, identity_loader(batches))


def test_per_image_dice_matches_direct_count():
    probs = torch.tensor([[[[0.9, 0.2], [0.6, 0.1]]], [[[0.1, 0.1], [0.1, 0.1]]]])
    target = torch.tensor([[[[1, 1], [0, 0]]], [[[0, 0], [0, 0]]]])
    metric = PerImageDice((0.5,))
    metric.update(probs, target, torch.ones_like(target))
    # image 0: tp=1 (0.9), fp=1 (0.6), fn=1 (0.2) -> 2/4; image 1 empty and predicted empty -> 1
    torch.testing.assert_close(metric.compute()["dice"], torch.tensor([[0.5], [1.0]]))


def test_per_image_dice_is_returned_in_split_order_whatever_the_arrival_order():
    probs = torch.tensor([0.9, 0.1, 0.6]).view(3, 1, 1, 1)
    target = torch.ones(3, 1, 1, 1)
    metric = PerImageDice((0.5,))
    metric.update(probs[:2], target[:2], torch.ones_like(target[:2]), index=torch.tensor([2, 0]))
    metric.update(probs[2:], target[2:], torch.ones_like(target[2:]), index=torch.tensor([1]))
    # arrival: index 2 -> hit (1), index 0 -> miss (0), index 1 -> hit (1)
    torch.testing.assert_close(metric.compute()["dice"], torch.tensor([[0.0], [1.0], [1.0]]))


def test_recall_target_reports_whether_it_fell_back(tmp_path):
    module = DistillModule(
        student=TINY,
        loss={"kd_alpha": 0.5},
        thresholds=[0.9, 0.95],
        threshold_rule="recall_target",
        recall_target=1.0,
    )
    run = trainer(tmp_path)
    with pytest.warns(UserWarning, match="reaches 1.0 at no threshold"):
        run.fit(module, identity_loader(fake_batches()), identity_loader(fake_batches(2, seed=1)))
    chosen = module.results["val"]["chosen_threshold"]
    assert chosen["rule"] == "recall_target" and chosen["recall_target"] == 1.0
    # At 0.9 the untrained student (probabilities near 0.5) finds no vessel, and the teacher's noisy
    # logits (2 +- 1 on vessels) miss some: neither reaches recall 1, both fall back.
    assert chosen["fell_back"] == {"student": True, "teacher": True}


def test_compiled_student_and_loss_train_as_eager_and_keep_plain_checkpoint_keys(tmp_path):
    """model.compile compiles student and loss in one graph: the same losses step by step as eager."""
    losses = {}
    for compile in (False, True):
        torch.manual_seed(0)
        module = DistillModule(student=TINY, loss={"kd_alpha": 0.5}, compile=compile)
        record = RecordLosses()
        run = trainer(tmp_path / str(compile), max_steps=3, callbacks=[record])
        run.fit(module, identity_loader(fake_batches(3)), identity_loader(fake_batches(1, seed=1)))
        losses[compile] = torch.stack(record.losses)
    assert (module._compiled_loss is not None) and run.global_step == 3
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-5)
    assert all(key.startswith(("student.", "loss.", "curves.", "per_image.")) for key in module.state_dict())


def test_a_fit_interrupted_mid_epoch_leaves_nothing_in_the_next_fits_epoch_means(tmp_path):
    """A step's terms are summed when the next step settles them: the interrupted fit's last step,
    never settled, must not land in the means of the module's next fit."""

    class StopAfterTwoSteps(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                raise RuntimeError("interrupted")

    module = DistillModule(student=TINY, loss={"kd_alpha": 0.5})
    seen = []
    loss = module.loss.forward

    def recording_loss(*args, **kwargs):
        total, terms = loss(*args, **kwargs)
        seen.append(terms["total"].item())
        return total, terms

    module.loss.forward = recording_loss
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer(tmp_path / "first", callbacks=[StopAfterTwoSteps()]).fit(
            module, identity_loader(fake_batches(4))
        )
    seen.clear()
    run = trainer(tmp_path / "second")
    run.fit(module, identity_loader(fake_batches(4, seed=1)))
    rows = list(csv.DictReader((Path(run.logger.log_dir) / "metrics.csv").read_text().splitlines()))
    (logged,) = [float(r["train/loss/total_epoch"]) for r in rows if r["train/loss/total_epoch"]]
    assert logged == pytest.approx(sum(seen) / len(seen), rel=1e-5)  # four batches of two


@pytest.mark.parametrize("loss", [{"kd_alpha": 1}, {"kd_alpha": 0, "gt_dice": {"weight": None}}])
def test_a_compiled_loss_of_one_term_at_scale_one_keeps_its_gradient(loss):
    """Inductor folded 0 + 1.0 * term into the term, returned detached beside it, and the total lost its grad."""
    module = DistillModule(student=TINY, loss=loss, compile=True)
    module.on_fit_start()
    total, names, values = module.training_loss(fake_batches(1)[0])
    total.backward()
    assert all(p.grad is not None for p in module.student.parameters() if p.requires_grad)
    assert values.shape == (len(names),) and "total" in names


def test_a_second_compiled_run_in_one_process_at_another_crop_size_trains(tmp_path):
    """Dynamo would trace the second run with symbolic sizes (inductor failed on a 48 px crop's padding)."""
    for size in (32, 48):
        module = DistillModule(student=TINY, loss={"kd_alpha": 0.5}, compile=True)
        run = trainer(tmp_path / str(size), max_steps=2)
        run.fit(module, identity_loader(fake_batches(2, size=size)))
        assert run.global_step == 2


def test_a_one_threshold_grid_and_a_one_image_split_still_give_lists(tmp_path):
    module = DistillModule(student=TINY, loss={"kd_alpha": 0.5}, thresholds=[0.5])
    one_image = [{k: v[:1] for k, v in fake_batches(1, seed=1)[0].items()}]
    trainer(tmp_path, max_steps=1).fit(module, identity_loader(fake_batches(1)), identity_loader(one_image))
    report = module.results["val"]
    assert report["n_images"] == 1 and report["chosen_threshold"]["student"] == 0.5
    for who in ("student", "teacher"):
        assert all(len(report[who][name]) == 1 for name in ("dice", "recall", "precision", "iou"))
        assert len(report["per_image_dice"][who]) == 1


def test_ema_weights_are_what_validation_scores_and_checkpoints_hold(tmp_path):
    decay = 0.5
    module = DistillModule(student=TINY, thresholds=[0.25, 0.5, 0.75], ema_decay=decay)
    live = []  # the trained weights (and BatchNorm statistics) after every optimizer step

    class RecordLive(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            state = pl_module.student.state_dict()
            live.append({k: v.clone() for k, v in state.items() if v.is_floating_point()})

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    run = trainer(tmp_path, enable_checkpointing=True, callbacks=[RecordLive(), checkpoints])
    run.fit(module, identity_loader(fake_batches()), identity_loader(fake_batches(2, seed=1)))
    expected = live[0]
    for weights in live[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    saved = torch.load(checkpoints.last_model_path, weights_only=True)
    for key, value in expected.items():
        torch.testing.assert_close(saved["state_dict"][f"student.{key}"], value)
        torch.testing.assert_close(saved["current_model_state"][f"student.{key}"], live[-1][key])
    # Validation during fit scored the averaged weights: a module loaded with them scores the same.
    averaged = DistillModule.load_from_checkpoint(checkpoints.last_model_path)
    trainer(tmp_path).validate(averaged, identity_loader(fake_batches(2, seed=1)), verbose=False)
    assert averaged.results["val"]["student"] == module.results["val"]["student"]


def test_bad_ema_decay_and_views_name_the_setting():
    with pytest.raises(ConfigError, match="model.ema_decay"):
        DistillModule(student=TINY, ema_decay=1.0)
    with pytest.raises(ConfigError, match="model.test_views.*spin"):
        DistillModule(student=TINY, test_views="d4,spin")


def test_validation_batches_of_different_image_sizes_fill_the_overlays(tmp_path):
    """Each eval batch is padded to its own largest image; the overlay samples of two such batches were
    concatenated unpadded (RuntimeError: sizes of tensors must match)."""
    module = DistillModule(student=TINY, loss={"kd_alpha": 0.5}, n_overlays=4)
    val = fake_batches(1, size=32, seed=1) + fake_batches(1, size=48, seed=2)
    trainer(tmp_path, max_steps=1).fit(module, identity_loader(fake_batches(1)), identity_loader(val))
    samples = module.overlay_samples
    assert samples["image"].shape == (4, 3, 48, 48) and samples["student"].shape == (4, 1, 48, 48)
    assert (
        samples["roi"][:2, :, 32:].sum() == 0 and samples["roi"][2:].sum() > 0
    )  # padding is outside the roi


class FusedAdamW(DistillModule):
    """configure_optimizers picks fused AdamW on CUDA without a GradScaler; here on the CPU too."""

    def make_optimizer(self, fused=False):
        return super().make_optimizer(fused=True)


class ClippedGradNorm(pl.Callback):
    """The gradient norm each step handed to the optimizer (Lightning zeroes gradients in the next step)."""

    def __init__(self):
        self.norms = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


@pytest.mark.parametrize("algorithm, bound", [("norm", 1e-3), ("value", None)])
def test_fused_adamw_trains_with_gradient_clipping_which_lightning_alone_refuses(tmp_path, algorithm, bound):
    """Lightning raises for clipping with an optimizer that unscales itself; the module clips instead."""
    module = FusedAdamW(student=StudentConfig(name="unet", encoder="resnet18"), loss={"kd_alpha": 0.5})
    norms = ClippedGradNorm()
    run = trainer(
        tmp_path, max_steps=2, precision="bf16-mixed", gradient_clip_val=1e-3,
        gradient_clip_algorithm=algorithm, callbacks=[norms], limit_val_batches=0,
    )  # fmt: skip
    run.fit(module, identity_loader(fake_batches(2)))
    assert run.optimizers[0].defaults["fused"] and len(norms.norms) == 2
    if algorithm == "norm":
        assert max(norms.norms) <= bound * 1.01
    else:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert max(float(g.abs().max()) for g in grads) <= 1e-3 * 1.0001


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_norm", [1e-3, 1e6])
def test_fused_clipping_by_norm_steps_as_clip_grad_norm_then_adamw(max_norm, dtype):
    """The module clips through the fused step's grad_scale: the same parameters and gradients after the
    step as torch's clip_grad_norm_ followed by AdamW, whether the norm is above max_norm or not, for
    float32 and float64 parameters (the fused kernels take a float32 scale only). A next step with
    clipping off is not scaled by the last one's."""
    clipped, reference = FusedAdamW(student=TINY).to(dtype), FusedAdamW(student=TINY).to(dtype)
    reference.load_state_dict(clipped.state_dict())
    optimizer, reference_optimizer = clipped.make_optimizer(), reference.make_optimizer()
    clipped._clips_fused_gradients = lambda: True  # single device, bf16: what the Trainer would answer
    generator = torch.Generator().manual_seed(0)
    for clip in (max_norm, None):
        for a, b in zip(clipped.parameters(), reference.parameters(), strict=True):
            a.grad = torch.randn(a.shape, generator=generator, dtype=dtype)
            b.grad = a.grad.clone()
        clipped.configure_gradient_clipping(optimizer, clip, "norm")
        optimizer.step()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        reference_optimizer.step()
        for a, b in zip(clipped.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_a_clip_value_of_zero_or_less_leaves_fused_gradients_alone_as_lightning_does(algorithm):
    module = FusedAdamW(student=TINY)
    optimizer = module.make_optimizer()
    for p in module.parameters():
        p.grad = torch.full_like(p, 3.0)
    for off in (None, 0.0, -1.0):
        module.configure_gradient_clipping(optimizer, off, algorithm)
    assert all(bool((p.grad == 3.0).all()) for p in module.parameters())


def test_a_fused_optimizer_with_a_grad_scaler_is_refused_rather_than_clipped_scaled(tmp_path):
    """fp16's GradScaler: the gradients are still scaled when clipping reads them (configure_optimizers
    never pairs them; a subclass could)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    run = trainer(
        tmp_path, max_steps=1, gradient_clip_val=1.0, limit_val_batches=0,
        plugins=[MixedPrecision("16-mixed", "cpu")],
    )  # fmt: skip
    with pytest.raises(ConfigError, match="still scaled"):
        run.fit(FusedAdamW(student=TINY, loss={"kd_alpha": 0.5}), identity_loader(fake_batches(1)))


def test_fused_adamw_is_only_picked_where_the_module_can_clip_whole_unscaled_gradients():
    """DeepSpeed is a DDPStrategy that shards gradients; FSDP shards them too; fp16 scales them."""
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        SingleDeviceStrategy,
    )

    module = DistillModule(student=TINY)
    for strategy, scaler, expected in [
        (SingleDeviceStrategy("cpu"), None, True),
        (DDPStrategy(), None, True),
        (DDPStrategy(), object(), False),
        (DeepSpeedStrategy.__new__(DeepSpeedStrategy), None, False),
        (FSDPStrategy.__new__(FSDPStrategy), None, False),
    ]:
        module._trainer = SimpleNamespace(strategy=strategy, precision_plugin=SimpleNamespace(scaler=scaler))
        assert module._clips_fused_gradients() is expected, (type(strategy).__name__, scaler)


def test_cuda_graph_names_every_setting_that_keeps_it_from_capturing(tmp_path):
    """model.cuda_graph on the CPU, in true bf16, with gradient accumulation, anomaly detection and
    reduce-overhead's own graphs: one ConfigError that names each, and the way out."""
    module = DistillModule(student=TINY, compile="reduce-overhead", cuda_graph=True)
    run = trainer(
        tmp_path, max_steps=1, accumulate_grad_batches=2, limit_val_batches=0, precision="bf16-true",
        detect_anomaly=True,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="model.cuda_graph=true") as raised:
        run.fit(module, identity_loader(fake_batches(2)))
    message = str(raised.value)
    for fix in (
        "trainer.accelerator=gpu",
        "trainer.strategy=ddp",
        "trainer.precision='bf16-true'",
        "accumulate_grad_batches=1",
        "detect_anomaly=false",
        "'reduce-overhead'",
        "cuda_graph=false",
    ):
        assert fix in message, fix
    assert run.global_step == 0


def test_a_step_is_not_captured_before_the_optimizer_has_state():
    """Captured before its first step, AdamW's state would be created inside the graph and reset by
    every replay."""
    from distill.graphed_step import GraphedStep

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight])
    with pytest.raises(ValueError, match=r"no state for 1 of its 1 parameters \(shapes \[\(3,\)\]"):
        GraphedStep(lambda batch: None, [optimizer], {"x": torch.ones(3)})


def test_cuda_graph_runs_under_ddp_on_gpus_but_not_with_gloo_or_comm_hooks():
    from lightning.pytorch.strategies import DDPStrategy

    module = DistillModule(student=TINY, cuda_graph=True)

    def check(strategy):
        run = SimpleNamespace(strategy=strategy, precision="bf16-mixed", accumulate_grad_batches=1)
        module.check_cuda_graph(run)

    gpus = [torch.device("cuda", 0), torch.device("cuda", 1)]
    check(DDPStrategy(parallel_devices=gpus))
    with pytest.raises(ConfigError, match="communication hooks do not run in the graph"):
        check(DDPStrategy(parallel_devices=gpus, ddp_comm_hook=lambda state, bucket: None))
    with pytest.raises(ConfigError, match="its collectives need NCCL, not gloo"):
        check(DDPStrategy(parallel_devices=gpus, process_group_backend="gloo"))
    with pytest.raises(ConfigError, match="not cpu under DDPStrategy") as on_cpu:
        check(DDPStrategy(parallel_devices=[torch.device("cpu")] * 2))
    assert "NCCL" not in str(on_cpu.value)  # gloo follows from the CPU: one problem, one fix
