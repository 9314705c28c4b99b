"""The on-disk model: folders, claimed jobs, transfers, locks, records. Torch-free except checkpoints."""
