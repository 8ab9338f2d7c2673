"""The driver: one state machine that owns membership, recovery, checkpoints' commit and tracking."""
