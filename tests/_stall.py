"""A callback for the DDP timeout test: rank 1 stops making progress before its first training step."""

import time

import lightning.pytorch as pl


class StallOnRank1(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1:
            time.sleep(3600)
