"""The LightningModule: a student trained on ground truth + cached teacher logits, scored beside the teacher.

Validation sweeps a grid of thresholds for the student and, from the cached logits of the same images,
for the teacher; each picks its own threshold by `threshold_rule`. The student's choice is frozen into
the checkpoint (`checkpoint["distill"]`) and used unchanged on test. With `test_views` the student is
also scored averaged over those views ("student_views", its own threshold, chosen on val the same way).
With `ema_decay` an exponential moving average of the weights is what validation scores and what
checkpoints hold (Lightning's WeightAveraging with torch's EMA).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.distributed import default_pg_timeout
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import get_ema_multi_avg_fn

from distill.errors import ConfigError
from distill.graphed_step import (
    WARMUP_STEPS,
    GraphedStep,
    ReplayWatchdog,
    average_gradients,
    broadcast_buffers,
)
from distill.losses import DistillLoss, FiniteCheck, stack_terms
from distill.metrics import (
    DEFAULT_THRESHOLDS,
    PerImageDice,
    ThresholdCurves,
    choose_threshold,
    curves_at,
    curves_to_json,
    per_image_means,
)
from distill.report import WHO, kd_margin
from distill.students import CHECKPOINT_FORMAT_VERSION, StudentConfig, count_parameters, create_student
from distill.views import expand_views, mean_over_views, same_views


def cat_padded(first: Tensor, second: Tensor) -> Tensor:
    """[B1,C,H1,W1] and [B2,C,H2,W2] -> [B1+B2,C,H,W], padded with 0 at the bottom/right to the larger
    H and W, as `collate_padded` pads a batch (batches of different image sizes, e.g. for overlays)."""
    height, width = max(first.shape[-2], second.shape[-2]), max(first.shape[-1], second.shape[-1])
    grown = [F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2])) for t in (first, second)]
    return torch.cat(grown)


def _holds_whole_gradients(strategy: Strategy) -> bool:
    """Whether each rank of `strategy` holds every gradient whole: one device, or DDP proper (not
    DeepSpeed, a DDPStrategy that shards them, nor FSDP)."""
    return isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(
        strategy, DeepSpeedStrategy
    )


# torch.compile's modes (model.compile); see torch.compile's documentation.
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
# The batch entries a training step reads (absent ones are None: no teacher, no skeleton, ...).
TRAINING_INPUTS = ("image", "mask", "roi", "teacher", "skeleton", "teacher_valid")


class EpochLossMeans:
    """Batch-size-weighted mean of every loss term over an epoch, summed on the host.

    Lightning's own `on_epoch=True` bookkeeping walks each metric's state on every `self.log` (~0.3 ms
    of host time per term per step, which a GPU step cannot spare) and, with `sync_dist`, all-reduces
    each term every step under DDP. Here each step's terms arrive on the host anyway (FiniteCheck) and
    are added there, with no work queued on the GPU; ranks sync once per epoch.
    """

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.sums: Tensor | None = None
        self.count = 0

    def add(self, names: tuple[str, ...], values: Tensor, batch_size: int) -> None:
        """Add one step's terms: `values` [len(names)], the batch means of the terms `names`."""
        values = values.detach() * batch_size
        if self.sums is None:
            self.names, self.sums = names, values
        elif names != self.names:
            raise RuntimeError(f"loss terms changed within an epoch: {self.names} -> {names}")
        else:
            self.sums += values
        self.count += batch_size

    def pop(self) -> dict[str, Tensor]:
        """The epoch's means by term name (empty if no step ran); starts a new epoch."""
        means = {} if self.sums is None else dict(zip(self.names, self.sums / self.count, strict=True))
        self.names, self.sums, self.count = (), None, 0
        return means


class EMAWeights(WeightAveraging):
    """Lightning's weight averaging with torch's EMA of weights and buffers, updated after every step.

    While fitting, validation scores the EMA weights and checkpoints hold them as `state_dict` (the live
    weights under `current_model_state`, for resuming), so `best.ckpt`, `evaluate` and `export` use them.
    The average lives on `device` (the training device): on the CPU every step would copy all weights.
    """

    def __init__(self, decay: float, device: torch.device):
        super().__init__(device=device, multi_avg_fn=get_ema_multi_avg_fn(decay))

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        if self._average_model is not None:  # resuming a fit; validate/test just use state_dict, quietly
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class DistillModule(pl.LightningModule):
    """Student + DistillLoss + threshold-sweep metrics for student and teacher.

    Args:
        student: the student network by name (see `distill.students`): name, encoder, encoder_weights, extra.
        loss: the loss config; `distill.fit` fills it from the config's top-level `loss:` section
            (`distill.losses.resolve_loss_config`).
        lr: AdamW peak learning rate, reached after the warm-up and decayed by cosine to 0.
        weight_decay: AdamW weight decay.
        warmup_fraction: share of all training steps spent warming the learning rate up from 0, in [0, 1).
        thresholds: probability grid swept on every validation/test pass (the curves and tables).
        threshold_rule: how validation picks the threshold frozen for test: "max_dice", or
            "recall_target" (the highest threshold whose recall >= recall_target).
        recall_target: the recall that "recall_target" asks for.
        channels_last: run the student in channels_last memory format on CUDA (faster convolutions).
        compile: torch.compile the student and its loss as one graph for training: true (torch's
            "default" mode) or a torch.compile mode. "reduce-overhead" also replays the step's kernels
            as CUDA graphs, which pays where launching them is the bottleneck (small crops, small
            students); it needs fixed crop and batch sizes. Evaluation runs the student uncompiled.
        cuda_graph: capture the whole training update (forward, loss, backward, clipping, AdamW) as
            one CUDA graph after a few eager steps and replay it (`distill.graphed_step`): one launch
            per step, for small crops and students whose steps wait on the host. CUDA devices (one, or
            several under DDP over NCCL, without communication hooks: the graph all-reduces the
            gradients itself), bf16-mixed or 32-true precision, fixed crop and batch sizes, no gradient
            accumulation; combine with compile: true (not "reduce-overhead" or "max-autotune", whose
            own graphs it replaces).
        n_overlays: images drawn in overlays_<split>.png.
        test_views: D4 views whose logit mean also scores the student ("d4" = all 8; null: none).
        ema_decay: keep an exponential moving average of the weights with this decay (e.g. 0.999)
            and validate, test and checkpoint it; null: none.
    """

    def __init__(
        self,
        student: StudentConfig = StudentConfig(),
        loss: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_fraction: float = 0.05,
        thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
        threshold_rule: Literal["max_dice", "recall_target"] = "max_dice",
        recall_target: float = 0.85,
        channels_last: bool = True,
        compile: bool | CompileMode = False,
        n_overlays: int = 6,
        test_views: list[str] | str | None = None,
        ema_decay: float | None = None,
        cuda_graph: bool = False,
    ):
        super().__init__()
        # Lightning's load_from_checkpoint passes the saved plain dicts back: accept both.
        student = student if isinstance(student, StudentConfig) else StudentConfig(**student)
        if not 0 <= warmup_fraction < 1:
            raise ConfigError(f"model.warmup_fraction={warmup_fraction}: must be in [0, 1)")
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ConfigError(f"model.ema_decay={ema_decay}: must be in (0, 1), e.g. 0.999, or null for none")
        try:
            views = tuple(expand_views(test_views)) if test_views else ()
        except ValueError as err:
            raise ConfigError(f"model.test_views={test_views!r}: {err}") from err
        self.loss = DistillLoss(loss)
        # Plain types only, so that checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "student": asdict(student),
                "loss": self.loss.config,
                "lr": lr,
                "weight_decay": weight_decay,
                "warmup_fraction": warmup_fraction,
                "thresholds": [float(t) for t in thresholds],
                "threshold_rule": threshold_rule,
                "recall_target": recall_target,
                "channels_last": channels_last,
                "compile": compile,
                "n_overlays": n_overlays,
                "test_views": list(views) or None,
                "ema_decay": ema_decay,
                "cuda_graph": cuda_graph,
            }
        )
        self.student = create_student(**student.kwargs())
        self.thresholds = tuple(float(t) for t in thresholds)
        self.threshold_rule = threshold_rule
        self.recall_target = recall_target
        self.n_overlays = n_overlays
        self.test_views = views
        self.curves = nn.ModuleDict(
            {f"{stage}_{who}": ThresholdCurves(self.thresholds) for stage in ("val", "test") for who in WHO}
        )
        self.per_image = nn.ModuleDict(
            {
                # the inputs were checked by ThresholdCurves already
                f"{stage}_{who}": PerImageDice(self.thresholds, validate_args=False)
                for stage in ("val", "test")
                for who in WHO
            }
        )
        self.chosen_threshold: float | None = None  # the student's, chosen on validation, frozen for test
        self.teacher_threshold: float | None = None
        self.scored_teacher: dict[str, Any] | None = None  # whose teacher_threshold (see on_fit_start)
        self.views_threshold: float | None = None  # the student's over test_views, chosen on validation
        self.freeze_thresholds = False  # True: validation too scores at the thresholds set, choosing none
        self.results: dict[str, dict[str, Any]] = {}  # split -> metrics.json body (see distill.report)
        # The first n_overlays images of the last val or test pass, with both predictions and their
        # ids (for overlay pictures).
        self.overlay_samples: dict[str, Any] = {}
        self._compiled_loss: Callable[..., tuple[Tensor, tuple[str, ...], Tensor]] | None = None
        # (global step, epoch, batch index, batch size, its terms) of the last step: see training_step
        self._unsettled: tuple[int, int, int, int, FiniteCheck] | None = None
        self._epoch_losses = EpochLossMeans()
        self._graphed_step: GraphedStep | None = None  # model.cuda_graph: the captured update
        self._eager_steps = 0  # optimizer steps taken eagerly in this fit (the graph's warm-up)
        self._step_in_graph = False  # whether this step's update is the graph's (see optimizer_step)
        self._replay_watchdog: ReplayWatchdog | None = None  # under DDP, while replaying

    # -- training -------------------------------------------------------------------------------

    def configure_callbacks(self) -> list[Callback]:
        """The EMA of the weights (a fresh one per fit/validate/test call; it only acts while fitting)."""
        if self.hparams.ema_decay is None:
            return []
        return [EMAWeights(self.hparams.ema_decay, self.trainer.strategy.root_device)]

    @property
    def trains_on_teacher(self) -> bool:
        """Whether training batches need teacher logits (the DataModule reads them for training only then)."""
        return bool(self.loss.terms_needing("teacher_logits"))

    def setup(self, stage: str) -> None:
        # Here, before DDP wraps the student: its gradient buckets keep the parameter strides they see
        # (converted later, every gradient is copied strided into its bucket at every step).
        if self.hparams.channels_last and self.trainer.strategy.root_device.type == "cuda":
            self.student.to(memory_format=torch.channels_last)

    def on_fit_start(self) -> None:
        # _trainer: also called without one (scripts/bench_fit.py's pure step)
        scored_teacher = getattr(getattr(self._trainer, "datamodule", None), "scored_teacher", None)
        self.scored_teacher = scored_teacher() if scored_teacher is not None else None
        if self.hparams.compile:
            mode = "default" if self.hparams.compile is True else self.hparams.compile
            # Static shapes: training crops and batches have one size. Without dynamic=False a second
            # compile of this code in one process (another run, another crop size) makes dynamo trace
            # symbolic sizes, on which inductor fails for crops that are not multiples of 32.
            self._compiled_loss = torch.compile(self.student_loss, mode=mode, dynamic=False)
        self._graphed_step, self._eager_steps, self._step_in_graph = None, 0, False
        if self.hparams.cuda_graph and self._trainer is not None:  # (bench_fit's pure step has none)
            self.check_cuda_graph(self.trainer)

    def check_cuda_graph(self, trainer: pl.Trainer) -> None:
        """Raise a ConfigError naming each setting of `trainer` (or of the module) that keeps
        model.cuda_graph from capturing the update. `distill.fit` calls it before any data is read."""
        problems = []
        strategy = trainer.strategy
        ddp = _holds_whole_gradients(strategy) and isinstance(strategy, DDPStrategy)
        cuda = strategy.root_device.type == "cuda"
        if not (cuda and _holds_whole_gradients(strategy)):
            problems.append(
                f"it needs CUDA devices, one or several under DDP, not {strategy.root_device.type} under "
                f"{type(strategy).__name__} (set trainer.accelerator=gpu; several devices: trainer.strategy=ddp)"
            )
        elif ddp and strategy._get_process_group_backend() != "nccl":  # (on the CPU: gloo, said above)
            problems.append(
                f"its collectives need NCCL, not {strategy._get_process_group_backend()} "
                "(drop the strategy's process_group_backend)"
            )
        if ddp and strategy._ddp_comm_hook is not None:
            problems.append(
                "DDP's communication hooks do not run in the graph (drop the strategy's ddp_comm_hook)"
            )
        if trainer.precision not in ("bf16-mixed", "32-true"):
            problems.append(
                f"trainer.precision={trainer.precision!r} (fp16's GradScaler syncs every step; the true half "
                "and double precisions change the default dtype) is not supported: set bf16-mixed or 32-true"
            )
        if trainer.accumulate_grad_batches != 1:
            problems.append("it replays whole updates (set trainer.accumulate_grad_batches=1)")
        if getattr(trainer, "_detect_anomaly", False):  # Trainer(detect_anomaly=...) keeps no public copy
            problems.append(
                "anomaly detection checks every operation on the host (set trainer.detect_anomaly=false)"
            )
        if self.hparams.compile in ("reduce-overhead", "max-autotune"):
            problems.append(
                f"model.compile={self.hparams.compile!r} records CUDA graphs of its own (use true)"
            )
        if problems:
            raise ConfigError(
                "model.cuda_graph=true: " + "; ".join(problems) + "; or set model.cuda_graph=false"
            )

    def forward(self, images: Tensor) -> Tensor:
        """Student logits [B,1,H,W] of images [B,3,H,W] (float, normalised by the student)."""
        if self.hparams.channels_last and images.is_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.student(images)

    def student_loss(
        self,
        images: Tensor,
        mask: Tensor,
        roi: Tensor,
        teacher: Tensor | None = None,
        skeleton: Tensor | None = None,
        teacher_valid: Tensor | None = None,
    ) -> tuple[Tensor, tuple[str, ...], Tensor]:
        """(total, term names, term values [len(names)]) of `DistillLoss` on the student's logits of `images`.

        The values are stacked here, inside the compiled graph, as a new tensor: returned as detached
        aliases of the total, inductor dropped the total's gradient when a lone term at scale 1 was both.
        """
        total, terms = self.loss(self(images), mask, roi, teacher, skeleton, teacher_valid)
        return (total, *stack_terms(terms))

    def training_loss(self, batch: dict[str, Any]) -> tuple[Tensor, tuple[str, ...], Tensor]:
        """(total, term names, term values [len(names)]) of a training batch, compiled with model.compile.

        Under "reduce-overhead" the outputs are overwritten by the next step's replay: read them (or
        queue work on them) within this step. training_step does: the terms' host copy and Lightning's
        clones of the total and of logged values are queued before the next replay.
        """
        student_loss = self.student_loss
        if self._compiled_loss is not None:
            torch.compiler.cudagraph_mark_step_begin()
            student_loss = self._compiled_loss
        return student_loss(*(batch.get(key) for key in TRAINING_INPUTS))

    def training_update(self, batch: dict[str, Any]) -> tuple[Tensor, tuple[str, ...], Tensor]:
        """One whole update, as model.cuda_graph captures it: the loss (as `training_loss`), backward,
        under DDP the gradients' mean over ranks, the trainer's gradient clipping and the optimizer's
        step; under DDP then rank 0's buffers everywhere. Returns the detached total, names, values."""
        optimizer = self.optimizers(use_pl_optimizer=False)
        distributed = self.trainer.world_size > 1  # DDP's work, done in the graph (see _graphed_update)
        total, names, values = self.training_loss(batch)
        with torch.autocast(self.device.type, enabled=False):  # as under Lightning: only the loss autocasts
            total.backward()
            if distributed:
                average_gradients(self.parameters())
            clip_val, algorithm = self.trainer.gradient_clip_val, self.trainer.gradient_clip_algorithm
            self.configure_gradient_clipping(optimizer, clip_val, algorithm)
            optimizer.step()
        if distributed:
            # DDP broadcasts them before each forward; after the update leaves rank 0's the same
            broadcast_buffers(self.buffers())
        return total.detach(), names, values

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: torch.optim.Optimizer,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """Lightning's step; under model.cuda_graph, after `WARMUP_STEPS` eager ones, the closure's
        training_step replays the captured update (backward and step included), leaving nothing to do.

        on_before_optimizer_step hooks do not run for graphed steps, and on_after_backward hooks see no
        gradients (`p.grad` is None): the graph makes and consumes them.
        """
        self._step_in_graph = bool(self.hparams.cuda_graph) and self._eager_steps >= WARMUP_STEPS
        if self._step_in_graph:
            assert optimizer_closure is not None
            optimizer_closure()
            return
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._eager_steps += 1

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        if not self._step_in_graph:  # else the graph ran it
            super().backward(loss, *args, **kwargs)

    def _graphed_update(self, batch: dict[str, Any]) -> tuple[Tensor, tuple[str, ...], Tensor]:
        """`training_update` as a CUDA graph, captured on the first call (see `distill.graphed_step`)."""
        inputs = {key: batch[key] for key in TRAINING_INPUTS if batch.get(key) is not None}
        if self._graphed_step is None:
            optimizer = self.optimizers(use_pl_optimizer=False)
            if isinstance(self.trainer.strategy.model, DistributedDataParallel):
                # DDP's reducer would all-reduce in hooks on the host, which replays skip: from now on
                # DDP stands aside (as in its no_sync()) and training_update does its work in the graph.
                self.trainer.strategy.model.require_backward_grad_sync = False
                self._replay_watchdog = self._watch_replays()
            self._graphed_step = GraphedStep(self.training_update, [optimizer], inputs)
        outputs = self._graphed_step(inputs)
        if self._replay_watchdog is not None:
            self._replay_watchdog.replayed(self.global_step)
        return outputs

    def _watch_replays(self) -> ReplayWatchdog:
        """A ReplayWatchdog with DDP's collective timeout (fit's --ddp_timeout_s), which names this rank."""
        timeout = getattr(self.trainer.strategy, "_timeout", None) or default_pg_timeout
        timeout_s, trainer = timeout.total_seconds(), self.trainer

        def message(step: int) -> str:
            return (
                f"rank {trainer.global_rank}: the update of global step {step} (a CUDA graph replay, whose "
                f"all-reduce waits for all {trainer.world_size} processes) has not finished after "
                f"{timeout_s:.0f} s (--ddp_timeout_s, or DDPStrategy's timeout): another process stopped "
                "making progress (crashed, hung, or is far slower; its own output says which). Ending this "
                "process, as NCCL's watchdog ends one whose collective timed out."
            )

        return ReplayWatchdog(timeout_s, message, self.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        update = self._graphed_update if self._step_in_graph else self.training_loss
        total, names, values = update(batch)
        # The terms reach the host one step late (see FiniteCheck): the previous step's are checked and
        # summed now, so the host never waits for this one; a NaN is still named exactly.
        buffer = self._settle_last_step()
        batch_size = batch["image"].shape[0]
        terms = FiniteCheck(names, values, buffer)
        self._unsettled = (self.global_step, self.current_epoch, batch_idx, batch_size, terms)
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:  # the steps Lightning's logger writes
            step_values = {
                f"train/loss/{name}_step": value for name, value in zip(names, values.unbind(), strict=True)
            }
            self.log_dict(step_values, on_step=True, on_epoch=False, batch_size=batch_size, sync_dist=True)
            # A CPU tensor: Lightning copies a float to the GPU and waits for the copy (the GPU's whole
            # queue). The rate is the same on every rank: nothing to sync.
            lr = torch.tensor(float(self.optimizers().param_groups[0]["lr"]))
            self.log("train/lr", lr, on_step=True, on_epoch=False, batch_size=batch_size)
        return total

    def _settle_last_step(self) -> Tensor | None:
        """Add the last unsettled step's terms to the epoch means, or raise if one was NaN/inf (naming
        the step and the term). Returns their host memory, free for the next step's copy."""
        if self._unsettled is None:
            return None
        step, epoch, batch_idx, batch_size, terms = self._unsettled
        self._unsettled = None
        bad = terms.first_nonfinite()
        if bad is not None:
            raise FloatingPointError(
                f"loss term {bad!r} is {terms.value(bad)} at global step {step} "
                f"(epoch {epoch}, batch {batch_idx}): lower model.lr, check the data and "
                "teacher cache, or resume from the last good checkpoint"
            )
        self._epoch_losses.add(terms.names, terms.host_values(), batch_size)
        return terms.host_values()

    def on_train_epoch_start(self) -> None:
        # Nothing left from an interrupted fit of this module: neither its sums nor its last step.
        self._epoch_losses.pop()
        self._unsettled = None

    def on_train_epoch_end(self) -> None:
        self._settle_last_step()
        means = self._epoch_losses.pop()
        # Every rank ran as many equal batches (EndlessBatches), so the mean of rank means is exact.
        # On the device: that is where DDP's sync_dist reduces them.
        self.log_dict(
            {f"train/loss/{name}_epoch": v.to(self.device) for name, v in means.items()},
            on_epoch=True,
            sync_dist=True,
        )

    def on_validation_start(self) -> None:
        self._settle_last_step()  # never validate (or checkpoint) weights a NaN step produced

    def on_train_end(self) -> None:
        self._settle_last_step()
        self._graphed_step, self._step_in_graph = None, False  # its memory goes back to the allocator
        if self._replay_watchdog is not None:
            self._replay_watchdog.close()
            self._replay_watchdog = None
        for optimizer in self.trainer.optimizers:  # the last clipping scale (in the graph's memory, if any)
            if hasattr(optimizer, "grad_scale"):
                del optimizer.grad_scale

    def make_optimizer(self, fused: bool = False) -> torch.optim.AdamW:
        """AdamW over every parameter; `fused`: torch's fused kernels, else its default (multi-tensor on CUDA).

        Fused, a step is a few kernels and no host work per parameter; the multi-tensor step reads
        two step counters per parameter on the host (~280 reads per step for UNet-R34).
        """
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=fused or None
        )

    def configure_optimizers(self) -> dict[str, Any]:
        fused = self.trainer.strategy.root_device.type == "cuda" and self._clips_fused_gradients()
        optimizer = self.make_optimizer(fused)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        warmup_steps = int(self.hparams.warmup_fraction * total_steps)

        def warmup_then_cosine(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _clips_fused_gradients(self) -> bool:
        """Whether the module can clip the gradients of a fused optimizer (configure_gradient_clipping).

        Not with a GradScaler (16-mixed): the fused step unscales them inside, after clipping would
        have read them scaled. Not with sharded strategies (FSDP, DeepSpeed): a rank holds a shard of
        the gradients, whose norm is not theirs. Single-device and DDP runs hold them whole, unscaled.
        """
        return _holds_whole_gradients(self.trainer.strategy) and (
            getattr(self.trainer.precision_plugin, "scaler", None) is None
        )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """trainer.gradient_clip_val/algorithm, clipped here for the fused AdamW of configure_optimizers.

        Lightning refuses to clip for an optimizer that unscales gradients itself (what fused kernels
        declare) because a GradScaler's gradients would still be scaled; the module uses one only where
        the gradients are whole and unscaled (`_clips_fused_gradients`), and refuses otherwise. By norm,
        the fused step itself scales the gradients (its `grad_scale`), saving a pass over them. Other
        optimizers: Lightning's clipping.

        Raises:
            ConfigError: a fused optimizer with a GradScaler or a sharded strategy.
        """
        if not getattr(optimizer, "_step_supports_amp_scaling", False):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if hasattr(optimizer, "grad_scale"):  # the last step's clipping scale: not this step's
            del optimizer.grad_scale
        if gradient_clip_val is None or gradient_clip_val <= 0:  # off, as in Lightning
            return
        if not self._clips_fused_gradients():  # e.g. a subclass's make_optimizer
            raise ConfigError(
                "a fused optimizer cannot be clipped here: its gradients are still scaled (16-mixed) or "
                "sharded (FSDP/DeepSpeed); use an unfused optimizer or precision bf16-mixed"
            )
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(parameters, gradient_clip_val)
            return
        # As clip_grad_norm_, without its pass over every gradient: the fused step divides the
        # gradients by `grad_scale` as it reads them (GradScaler's unscaling) and writes them back so.
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
        # float32 whatever the parameters' dtype: the fused kernels take no other scale
        optimizer.grad_scale = torch.clamp((norm.float() + 1e-6) / gradient_clip_val, min=1.0)

    # -- validation and test ---------------------------------------------------------------------

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        probs = {"student": torch.sigmoid(self(batch["image"]).float())}
        if self.test_views:
            probs["student_views"] = torch.sigmoid(
                mean_over_views(self, batch["image"], self.test_views).float()
            )
        if "teacher" in batch:
            probs["teacher"] = torch.sigmoid(batch["teacher"].float())
        for who, p in probs.items():
            self.curves[f"{stage}_{who}"].update(p, batch["mask"], batch["roi"])
            self.per_image[f"{stage}_{who}"].update(p, batch["mask"], batch["roi"], batch.get("index"))
        have = self.overlay_samples.get("image", torch.zeros(0)).shape[0]
        if have < self.n_overlays:
            take = slice(0, self.n_overlays - have)
            new = {"image": batch["image"], "mask": batch["mask"], "roi": batch["roi"], **probs}
            for key, value in new.items():
                value = value[take].detach().cpu()
                self.overlay_samples[key] = (
                    cat_padded(self.overlay_samples[key], value) if key in self.overlay_samples else value
                )
            if "id" in batch:  # so that each overlay row can name its image
                self.overlay_samples["id"] = [*self.overlay_samples.get("id", []), *batch["id"][take]]

    def on_validation_epoch_start(self) -> None:
        self.overlay_samples = {}
        if self._graphed_step is not None and self.trainer.world_size > 1:
            # Every rank validates with rank 0's buffers, as under DDP (whose first forward here would
            # broadcast them): after the EMA swap (callbacks run first), the EMA's too.
            broadcast_buffers(self.buffers())

    def on_test_epoch_start(self) -> None:
        self.overlay_samples = {}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        report = self._summarise("val")
        if self.trainer.sanity_checking:
            return
        self.chosen_threshold = report["chosen_threshold"]["student"]
        self.teacher_threshold = report["chosen_threshold"].get("teacher")
        self.views_threshold = report["chosen_threshold"].get("student_views")
        self._log_report(report)

    def on_test_epoch_end(self) -> None:
        if self.chosen_threshold is None or (self.test_views and self.views_threshold is None):
            raise ConfigError(
                "test needs the thresholds chosen on validation: load a checkpoint written after validation "
                "with the same model.test_views, or validate first (checkpoint['distill']['chosen_threshold'] "
                "or ['views_threshold'] is None)"
            )
        self._log_report(self._summarise("test"))

    def _summarise(self, stage: str) -> dict[str, Any]:
        """Compute, reset and turn this stage's metrics into a metrics.json body (thresholds frozen on test)."""
        report: dict[str, Any] = {
            "split": stage,
            "thresholds": list(self.thresholds),
            "chosen_threshold": {"rule": self.threshold_rule},
            "at_chosen": {},
            "per_image_dice": {},
            "per_image_dice_mean": {},
        }
        frozen = {
            "student": self.chosen_threshold,
            "student_views": self.views_threshold,
            "teacher": self.teacher_threshold,
        }
        for who in WHO:
            curves_metric, per_image_metric = self.curves[f"{stage}_{who}"], self.per_image[f"{stage}_{who}"]
            if curves_metric.update_count == 0:
                continue
            # torchmetrics squeezes one-element results (one threshold, or one image at one threshold).
            curves = {name: values.reshape(-1) for name, values in curves_metric.compute().items()}
            per_image = per_image_metric.compute()
            curves_metric.reset(), per_image_metric.reset()
            if (stage == "val" and not self.freeze_thresholds) or frozen[who] is None:
                choice = choose_threshold(curves, self.threshold_rule, self.recall_target)
                index, threshold = choice
                if self.threshold_rule == "recall_target":
                    report["chosen_threshold"]["recall_target"] = self.recall_target
                    report["chosen_threshold"].setdefault("fell_back", {})[who] = choice.fell_back
                    if choice.fell_back and not self.trainer.sanity_checking:
                        rank_zero_warn(
                            f"{stage}: the {who}'s recall reaches {self.recall_target} at no threshold; "
                            f"took the highest-recall one, {threshold}"
                        )
            else:
                index, threshold = self._index_of(frozen[who]), frozen[who]
            report[who] = {k: v for k, v in curves_to_json(curves).items() if k != "thresholds"}
            report["chosen_threshold"][who] = float(threshold)
            report["at_chosen"][who] = curves_at(curves, index)
            per_image_dice = per_image["dice"].reshape(-1, len(self.thresholds))
            dice = [round(float(d), 6) for d in per_image_dice[:, index]]
            has_vessels = [bool(v) for v in per_image["has_vessels"].reshape(-1)]
            report["per_image_dice"][who] = dice
            report["per_image_dice_mean"][who] = per_image_means(dice, has_vessels)
            report["per_image_has_vessels"] = has_vessels
            report["n_images"] = len(dice)
        if self.test_views:
            report["test_views"] = list(self.test_views)
        if stage == "val" and kd_margin(report) is not None:
            report["kd_margin"] = kd_margin(report)
        datamodule = self.trainer.datamodule
        ids = getattr(datamodule, f"{stage}_ids", None)
        if ids is not None and len(ids) == report.get("n_images"):
            report["per_image_ids"] = list(ids)  # per_image_dice is in split order (PerImageDice)
        no_map = getattr(datamodule, "teacher_no_mask_ids", None)
        if "teacher" in report and ids is not None and no_map is not None:
            report["teacher_no_mask_ids"] = [i for i in ids if i in no_map]  # scored as empty predictions
        self.results[stage] = report
        return report

    def _index_of(self, threshold: float) -> int:
        for index, candidate in enumerate(self.thresholds):
            if math.isclose(candidate, threshold, abs_tol=1e-9):
                return index
        raise ConfigError(
            f"the frozen threshold {threshold} is not in model.thresholds={list(self.thresholds)}: "
            "test with the thresholds the run was validated with"
        )

    def _log_report(self, report: dict[str, Any]) -> None:
        stage = report["split"]
        values: dict[str, float] = {}
        for who in WHO:
            if who not in report:
                continue
            at = report["at_chosen"][who]
            values[f"{stage}/{who}/dice@best"] = at["dice"]
            values[f"{stage}/{who}/recall@best"] = at["recall"]
            values[f"{stage}/{who}/precision@best"] = at["precision"]
            values[f"{stage}/{who}/threshold"] = report["chosen_threshold"][who]
            means = report["per_image_dice_mean"][who]
            for name, key in (("dice_per_image", "with_vessels"), ("dice_per_image_all", "all")):
                if means[key] is not None:
                    values[f"{stage}/{who}/{name}@best"] = means[key]
            for i, t in enumerate(report["thresholds"]):
                for name in ("dice", "recall", "precision"):
                    values[f"{stage}/{who}/{name}@{t:.2f}"] = report[who][name][i]
        # Already reduced over ranks by torchmetrics, so identical on every rank: the mean that sync_dist
        # takes changes nothing, and without it Lightning warns once per metric name under DDP.
        self.log_dict(values, sync_dist=True)

    # -- checkpoints ----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["distill"] = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "student": dict(self.student.config),
            "chosen_threshold": self.chosen_threshold,
            "teacher_threshold": self.teacher_threshold,
            "scored_teacher": self.scored_teacher,
            "test_views": list(self.test_views),
            "views_threshold": self.views_threshold,
            "threshold_rule": self.threshold_rule,
            "thresholds": list(self.thresholds),
            "student_params": count_parameters(self.student),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("distill", {})
        self.chosen_threshold = info.get("chosen_threshold")
        self.teacher_threshold = info.get("teacher_threshold")
        self.scored_teacher = info.get("scored_teacher")
        # A threshold chosen over other views (or none) is no threshold for these: validate first.
        chosen_for_these = same_views(info.get("test_views") or (), self.test_views)
        self.views_threshold = info.get("views_threshold") if chosen_for_these else None
