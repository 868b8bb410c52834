"""FlexLoRA: entropy-guided flexible low-rank adaptation."""

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
