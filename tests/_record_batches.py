"""A callback for fit tests: appends (global step, batch ids) of every training step to $RECORD_BATCH_IDS."""

import json
import os

import lightning.pytorch as pl


class RecordBatchIds(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(os.environ["RECORD_BATCH_IDS"], "a") as out:
            out.write(json.dumps([trainer.global_step, list(batch["id"])]) + "\n")
