"""FlexLoRA configuration: one typed dataclass, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

IMPORTANCE_METRICS = ("entropy", "nuclear", "frobenius", "sensitivity", "elem", "mat")
MODES = ("flex", "prune_only", "expand_only")
EXPAND_INITS = ("zero_impact", "small", "zero", "orthogonal")
SCHEDULES = ("paper", "constant")
ADAPTER_DTYPES = ("float32", "bfloat16", "float16")
ORTH_REG_FORMS = ("mean_norm", "eq2_sum")  # see flexlora.regulariser


@dataclass
class FlexLoRAConfig:
    """Everything that defines a FlexLoRA adapter and its rank allocation.

    Step counts (``t_warmup``, ``t_final``, ``delta_t``, ``total_steps``) are optimizer steps,
    so gradient accumulation does not change when allocation happens.
    """

    target_modules: list[str] | str = field(default_factory=list)
    r: int = 8
    max_rank: int | None = None  # capacity per matrix; None -> ceil(1.5 * r), the paper's budget
    min_rank: int = 1
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    modules_to_save: list[str] = field(default_factory=list)  # extra modules kept trainable (e.g. a classifier head)
    b0: int = 4
    t_warmup: int = 0
    t_final: int = 0
    delta_t: int = 100
    total_steps: int | None = None  # may be filled in later (the Trainer callback does it from max_steps)
    orth_reg_weight: float = 0.1
    # mean_norm: w * mean over all P and Q factors of ||P^T P - I||_F, ||Q Q^T - I||_F (PEFT AdaLoRA's and the authors'
    # code's form, which produced the paper's numbers); eq2_sum: w * sum over matrices of the squared norms (eq. 2 as
    # printed), for the ablation
    orth_reg: str = "mean_norm"
    importance: str = "entropy"
    mode: str = "flex"
    expand_init: str = "zero_impact"
    schedule: str = "paper"
    seed: int = 0
    init_std: float = 0.02  # std of the Gaussian P / Q vectors (initial slots and expanded ones)
    small_init_value: float = 1e-3  # lambda given to a new direction by expand_init=small
    entropy_eps: float = 1e-8
    sensitivity_beta1: float = 0.85  # AdaLoRA's EMA factors for the sensitivity metric
    sensitivity_beta2: float = 0.85
    adapter_dtype: str = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if self.max_rank is None:
            self.max_rank = math.ceil(1.5 * self.r)
        self.validate()

    def validate(self) -> None:
        errors = []
        if not self.target_modules:
            errors.append("target_modules is empty: name the modules to adapt (e.g. ['q_proj', 'v_proj']) or give a regex")
        if not isinstance(self.target_modules, (str, list)) or (
            isinstance(self.target_modules, list) and not all(isinstance(t, str) for t in self.target_modules)
        ):
            errors.append(f"target_modules must be a list of names or a regex string, got {self.target_modules!r}")
        if not isinstance(self.r, int) or self.r < 1:
            errors.append(f"r must be an integer >= 1, got {self.r!r}")
        elif not isinstance(self.max_rank, int) or self.max_rank < self.r:
            errors.append(f"max_rank must be an integer >= r ({self.r}), got {self.max_rank!r}")
        if not isinstance(self.min_rank, int) or not 0 <= self.min_rank <= (self.r if isinstance(self.r, int) else 0):
            errors.append(f"min_rank must be an integer in [0, r={self.r}], got {self.min_rank!r}")
        if not self.lora_alpha > 0:
            errors.append(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            errors.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        for name in ("b0", "t_warmup", "t_final"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                errors.append(f"{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.delta_t, int) or self.delta_t < 1:
            errors.append(f"delta_t must be an integer >= 1, got {self.delta_t!r}")
        if self.total_steps is not None:
            if not isinstance(self.total_steps, int) or self.total_steps < 1:
                errors.append(f"total_steps must be an integer >= 1, got {self.total_steps!r}")
            elif isinstance(self.t_final, int) and self.t_final >= self.total_steps:
                errors.append(f"t_final ({self.t_final}) must be smaller than total_steps ({self.total_steps})")
        if not self.orth_reg_weight >= 0:
            errors.append(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if not self.init_std > 0:
            errors.append(f"init_std must be > 0, got {self.init_std!r}")
        if not self.entropy_eps > 0:
            errors.append(f"entropy_eps must be > 0, got {self.entropy_eps!r}")
        for name in ("sensitivity_beta1", "sensitivity_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                errors.append(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name, allowed in (
            ("importance", IMPORTANCE_METRICS),
            ("mode", MODES),
            ("expand_init", EXPAND_INITS),
            ("schedule", SCHEDULES),
            ("adapter_dtype", ADAPTER_DTYPES),
            ("orth_reg", ORTH_REG_FORMS),
        ):
            if getattr(self, name) not in allowed:
                errors.append(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if errors:
            raise ValueError("invalid FlexLoRAConfig:\n  - " + "\n  - ".join(errors))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FlexLoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown FlexLoRAConfig field(s): {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "FlexLoRAConfig":
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of FlexLoRAConfig fields, got {type(values).__name__}")
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "FlexLoRAConfig":
        return dataclasses.replace(self, **changes)
