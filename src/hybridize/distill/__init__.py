"""Distillation: chunked losses, the trainer (distillation, SFT, MMR probes) and torchrun support.

    losses       LossSpec, distillation_loss: reverse/forward KL, JSD, CE without full logits
    trainer      Trainer, TrainResult: AdamW + warmup/cosine, accumulation, resumable state
    distributed  joined_world, init_world, World: process group and FSDP2 sharding under torchrun
"""

from hybridize.distill.distributed import World, init_world, joined_world
from hybridize.distill.losses import LossSpec, distillation_loss
from hybridize.distill.trainer import Trainer, TrainResult

__all__ = ["LossSpec", "TrainResult", "Trainer", "World", "distillation_loss", "init_world", "joined_world"]
