"""workbench: train small transformers, look inside them, and find the circuits that explain them.

One side effect, on purpose: `import workbench` tunes glibc's malloc (`workbench.allocator.tune`) so
that large CPU buffers (attention patterns, SAE pre-activations) are reused instead of page-faulted
in afresh each time; caching every hook went from 1.78× to 1.30× a plain forward with it. It must run
before the first large tensor is freed, which is why it runs at import rather than when a model is
built. It changes nothing off glibc, and WORKBENCH_MALLOC=default skips it.
"""

from workbench import allocator
from workbench.errors import CheckpointError, ConfigError, HookNameError, InputError, OfflineError, WorkbenchError
from workbench.model.loading import load, resolve_device, save_model
from workbench.model.transformer import ModelConfig, Transformer

allocator.tune()  # large CPU buffers reused, not page-faulted in each time; WORKBENCH_MALLOC=default skips it

__all__ = ["CheckpointError", "ConfigError", "HookNameError", "InputError", "ModelConfig", "OfflineError",
           "Transformer", "WorkbenchError", "load", "resolve_device", "save_model"]
__version__ = "0.1.0"
