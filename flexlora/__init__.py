"""FlexLoRA: entropy-guided flexible low-rank adaptation."""

import logging

# Importing peft imports bitsandbytes where it is installed, which on AVX512-BF16 CPUs warns at every import that an
# optional kernel from the `kernels` package (a Hub download) is missing, and then uses its own: nothing to act on.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in record.msg)

from .allocator import RankAllocator, RankChange
from .config import FlexLoRAConfig
from .export import export_peft, load_adapters, save_adapters
from .layer import FlexLoRALayer
from .model import Adapters, inject
from .optim_state import param_groups

__all__ = [
    "Adapters",
    "FlexLoRAConfig",
    "FlexLoRALayer",
    "RankAllocator",
    "RankChange",
    "export_peft",
    "inject",
    "load_adapters",
    "param_groups",
    "save_adapters",
]
