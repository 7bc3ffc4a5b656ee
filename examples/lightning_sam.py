"""SAM+AACE in PyTorch Lightning, with manual optimisation: one ``aace.sam_step`` per training step.

Lightning's automatic optimisation calls ``optimizer.step(closure)`` once per batch with its own closure, which
knows nothing of w + e or of BatchNorm freezing; manual optimisation hands the step to ``aace.sam_step``.
Mixed precision: pass ``autocast=torch.autocast(...)`` (and a ``GradScaler`` for fp16) to ``sam_step``
rather than Lightning's ``precision=`` flag, whose scaler expects one backward per step.
"""
import lightning.pytorch as pl
import torch

import aace


class SAMModule(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, rho: float = 0.2, lr: float = 0.1, epochs: int = 10):
        super().__init__()
        self.model, self.rho, self.lr, self.epochs = model, rho, lr, epochs
        self.automatic_optimization = False  # the SAM step does its own two passes

    def configure_optimizers(self):
        optimizer = aace.SAM(self.model.parameters(), torch.optim.SGD, rho=self.rho, normalize=False, ascent=False,
                             lr=self.lr, momentum=0.9, weight_decay=5e-4)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.epochs)}

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizer = self.optimizers(use_pl_optimizer=False)  # the aace.SAM itself, not Lightning's wrapper
        result = aace.sam_step(self.model, optimizer, x, y, aace.aace_loss, torch.nn.functional.cross_entropy)
        self.log("train_loss", result.loss)
        return result.loss

    def on_train_epoch_end(self):
        self.lr_schedulers().step()  # manual optimisation steps the scheduler by hand
