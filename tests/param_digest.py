"""A test-only callback: each rank writes a digest of its parameters when fit ends."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer


def tensor_digest(tensors: dict) -> str:
    """SHA-256 over the names and bytes of the tensors in a (possibly nested) state dict."""
    digest = hashlib.sha256()
    for name, value in sorted(tensors.items()):
        digest.update(name.encode())
        if isinstance(value, dict):
            digest.update(tensor_digest(value).encode())
        elif hasattr(value, "detach"):
            if hasattr(value, "full_tensor"):  # an FSDP2 shard: digest the whole tensor (every rank gathers)
                value = value.full_tensor()
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def parameter_digest(module: LightningModule) -> str:
    return tensor_digest(module.state_dict())


class ParameterDigest(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "global_step": trainer.global_step,
            "digest": parameter_digest(pl_module),
            # elements this rank holds: a sharded strategy holds about 1/world_size of them
            "local_numel": sum(getattr(p, "_local_tensor", p).numel() for p in pl_module.parameters()),
            "numel": sum(p.numel() for p in pl_module.parameters()),
            "callbacks": {type(c).__name__: tensor_digest(c.state_dict()) for c in trainer.callbacks if c.state_dict()},
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class KillAfterStep(Callback):
    """Stop the process after a given optimizer step, as a pre-empted job is killed (exit code 3)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        if trainer.global_step == self.step:
            raise SystemExit(3)
