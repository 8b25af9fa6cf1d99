"""workbench: train small transformers, look inside them, and find the circuits that explain them."""

from workbench import allocator
from workbench.errors import CheckpointError, ConfigError, HookNameError, InputError, OfflineError, WorkbenchError
from workbench.loading import load, resolve_device, save_model
from workbench.model import ModelConfig, Transformer

allocator.tune()  # large CPU buffers reused, not page-faulted in each time; WORKBENCH_MALLOC=default skips it

__all__ = ["CheckpointError", "ConfigError", "HookNameError", "InputError", "ModelConfig", "OfflineError",
           "Transformer", "WorkbenchError", "load", "resolve_device", "save_model"]
__version__ = "0.1.0"
