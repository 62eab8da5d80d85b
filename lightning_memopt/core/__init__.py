"""What more than one technique needs, and nothing technique-specific (see docs/architecture.md)."""

from lightning_memopt.core.atomic_io import AtomicCheckpointIO
from lightning_memopt.core.checkpoints import UnsafeCheckpointError, read_checkpoint, verify_checkpoint

__all__ = ["AtomicCheckpointIO", "UnsafeCheckpointError", "read_checkpoint", "verify_checkpoint"]
