"""Projects that ``import pytorch_lightning``: the callbacks work with its Trainer; the presets say what to change."""

from __future__ import annotations

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning", reason="pytorch-lightning (the older package name) is not installed")


class PlainModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.encoder(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 8)), batch_size=4)


def test_pruning_and_qat_run_under_a_pytorch_lightning_trainer() -> None:
    from lightning_memopt import PruningScheduler, QuantizationAwareTraining

    pruning = PruningScheduler(final_sparsity=0.5, schedule="constant", start=0, modules=["encoder"])
    qat = QuantizationAwareTraining(modules=["encoder"])
    trainer = pl.Trainer(max_steps=3, callbacks=[pruning, qat], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    module = PlainModule()
    trainer.fit(module)
    assert pruning.sparsity == pytest.approx(0.5) and qat.enabled and trainer.global_step == 3


@pytest.mark.parametrize("preset", ["FSDP1Strategy", "FSDP2Strategy", "ZeROStrategy"])
def test_a_preset_given_to_a_pytorch_lightning_trainer_says_what_to_change(preset: str) -> None:
    import lightning_memopt

    with pytest.raises(ValueError) as refused:
        pl.Trainer(strategy=getattr(lightning_memopt, preset)(), accelerator="cpu")
    message = str(refused.value)
    assert f"lightning_memopt.{preset}" in message and "from lightning.pytorch import Trainer" in message
