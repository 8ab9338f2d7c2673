"""Persistent checkpoints: torch.distributed.checkpoint shards plus a manifest written last."""

from raypod.checkpoint.store import CheckpointStore, CommittedCheckpoint

__all__ = ["CheckpointStore", "CommittedCheckpoint"]
