"""The training layer: the language-model and modular-arithmetic trainers, their run folders (lock,
resume, Ctrl-C), and the multi-process setup."""

from workbench.train.lm import TrainConfig, load_train_config, train
from workbench.train.modular import ModularConfig, load_modular_config, train_modular
from workbench.train.runs import TrainingInterrupted

__all__ = ["ModularConfig", "TrainConfig", "TrainingInterrupted", "load_modular_config", "load_train_config",
           "train", "train_modular"]
