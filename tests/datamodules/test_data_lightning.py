"""The DataModule under a real Trainer: worker processes, epochs, validation, logged skip counts, checkpoint
state; and under 2-process DDP (gloo) with uneven shards: disjoint samples, equal batch counts, no hang."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy

from datamodules.buckets import BucketConfig
from datamodules.shards import expand_shards
from datamodules.video import VideoDataModule


class KeyRecorder(LightningModule):
    """Scales the video by one weight; remembers the keys it trained on and logs the skip counts."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.out_dir = out_dir
        self.train_keys: list[str] = []
        self.val_batches = 0
        self.video_dtypes: set[torch.dtype] = set()

    def training_step(self, batch, batch_idx):
        self.train_keys.extend(batch["meta"]["key"])
        self.video_dtypes.add(batch["video"].dtype)
        loss = (self.weight * batch["video"]).square().mean()
        self.log("loss", loss, sync_dist=True)  # a collective every step: unequal counts would hang here
        self.log_dict(self.trainer.datamodule.skipped_counts(), sync_dist=True, reduce_fx="sum")
        return loss

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_train_end(self):
        path = Path(self.out_dir) / f"rank{self.global_rank}.json"
        path.write_text(json.dumps({"keys": self.train_keys, "val_batches": self.val_batches}))


def datamodule(train, val, num_workers, batches):
    return VideoDataModule(
        train,
        val,
        batch_size=1,
        num_workers=num_workers,
        num_frames=5,
        fps=8,
        buckets=BucketConfig(size=128),
        batches_per_epoch=batches,
        val_batches=2,
    )


def test_trainer_fit_two_epochs_with_workers(sample_shards, tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"broken")
    dm = datamodule(
        expand_shards(sample_shards.train) + [str(bad)], sample_shards.val, num_workers=2, batches=6
    )
    model = KeyRecorder(str(tmp_path))
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 12 and len(model.train_keys) == 12
    assert model.video_dtypes == {torch.float32}  # workers ship uint8; on_after_batch_transfer normalises
    assert model.val_batches == 4
    assert trainer.callback_metrics["data/skipped_shard"] >= 1
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["VideoDataModule"]
    assert {c["batches"] for c in state["ranks"][0]["cursors"].values()} == {6}


@pytest.mark.slow
def test_ddp_two_processes_disjoint_and_equal(sample_shards, tmp_path):
    # 3 shards over 2 ranks: rank 0 owns two, rank 1 one (8 samples), which it must cycle to give 12 batches.
    train = expand_shards(sample_shards.train)[:3]
    dm = datamodule(train, sample_shards.val, num_workers=1, batches=12)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120)),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(KeyRecorder(str(tmp_path)), datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [len(r["keys"]) for r in ranks] == [12, 12]
    assert [r["val_batches"] for r in ranks] == [2, 2]
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])
    assert len(set(ranks[1]["keys"])) == 8  # rank 1 went round its one shard
