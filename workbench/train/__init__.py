"""The training layer: the language-model and modular-arithmetic trainers, the run lifecycle they share
(lock, resume, checkpoints, Ctrl-C, the final save), one optimizer config, and the multi-process setup."""

from workbench.train.lifecycle import Run, StopRequest, TrainingInterrupted
from workbench.train.lm import TrainConfig, load_train_config, train
from workbench.train.modular import ModularConfig, load_modular_config, require_modular, train_modular
from workbench.train.optim import OptimizerConfig, fused_adam, make_optimizer

__all__ = ["ModularConfig", "OptimizerConfig", "Run", "StopRequest", "TrainConfig", "TrainingInterrupted",
           "fused_adam", "load_modular_config", "load_train_config", "make_optimizer", "require_modular", "train",
           "train_modular"]
