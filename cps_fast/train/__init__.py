"""The CPS trainer: one readable step, CUDA-graph capture, DDP, checkpoints, logging."""
from .checkpoint import load_checkpoint, save_checkpoint
from .step import SGD, CPSStep, ohem_cross_entropy, poly_lr
from .trainer import Trainer

__all__ = ["CPSStep", "SGD", "Trainer", "load_checkpoint", "ohem_cross_entropy", "poly_lr", "save_checkpoint"]
