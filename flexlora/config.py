"""FlexLoRA configuration: one typed dataclass, validated on construction."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .names import ADAPTER_DTYPES, EXPAND_INITS, FACTOR_INITS, IMPORTANCE_METRICS, MODES, ORTH_REG_FORMS, SCHEDULES


class InvalidConfigError(UserError):
    """A config that cannot run (a FlexLoRAConfig, or a section of a recipe's config). ``problems`` holds one message
    per problem, each starting with the field it names, so whoever knows where the config sits prefixes its section
    (a recipe: ``adapter.r must be ...``, ``train.lr must be ...``)."""

    def __init__(self, problems: list[str], config_name: str = "FlexLoRAConfig"):
        self.problems = list(problems)
        fields = [problem.split(" ", 1)[0].rstrip(":") for problem in self.problems]
        super().__init__(f"invalid {config_name}:\n  - " + "\n  - ".join(self.problems), fields)


def raise_problems(config: object, problems: Iterable[str | None]) -> None:
    """How every config check reports: all problems found at once (a None entry is a check that passed), in one
    InvalidConfigError naming ``config``'s class; nothing when there are none."""
    found = [problem for problem in problems if problem is not None]
    if found:
        raise InvalidConfigError(found, type(config).__name__)


def choice_problem(name: str, value: Any, allowed: tuple[str, ...]) -> str | None:
    """The problem with a field that must be one of the names in ``allowed`` (a closed set), or None."""
    if isinstance(value, str) and value in allowed:
        return None
    return f"{name} must be one of {', '.join(allowed)}; got {value!r}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to a config


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_problem(name: str, value: Any, minimum: int) -> str | None:
    if not _is_int(value) or value < minimum:
        return f"{name} must be an integer >= {minimum}, got {value!r}"
    return None


def _number_problem(name: str, value: Any, low: float, low_inclusive: bool, high: float | None = None) -> str | None:
    """None when ``value`` is a finite real number in the range (``high`` exclusive); else the message."""
    if high is None:
        wanted = f"a finite number {'>=' if low_inclusive else '>'} {low:g}"
    else:
        wanted = f"a number in {'[' if low_inclusive else '('}{low:g}, {high:g})"
    if not _is_number(value) or not math.isfinite(value):
        return f"{name} must be {wanted}, got {value!r}"
    if (value < low if low_inclusive else value <= low) or (high is not None and value >= high):
        return f"{name} must be {wanted}, got {value!r}"
    return None


def _module_names_problem(name: str, value: Any, regex_allowed: bool) -> str | None:
    """target_modules (a list of names or one regex) / modules_to_save (a list of names): the message, or None."""
    if isinstance(value, str):
        if not regex_allowed:
            example = value.strip() or "classifier"
            return f"{name} must be a list of module names (e.g. [{example!r}]), got the string {value!r}"
        if not value.strip():
            return f"{name} is empty: name the modules to adapt (e.g. ['q_proj', 'v_proj']) or give a regex"
        try:
            re.compile(value)
        except re.error as error:
            return f"{name} {value!r} is not a valid regular expression: {error}"
        return None
    if not isinstance(value, list):
        kind = "a list of module names or a regex string" if regex_allowed else "a list of module names"
        return f"{name} must be {kind}, got {value!r}"
    if not value and regex_allowed:
        return f"{name} is empty: name the modules to adapt (e.g. ['q_proj', 'v_proj']) or give a regex"
    bad = [entry for entry in value if not isinstance(entry, str) or not entry.strip()]
    if bad:
        return f"{name} entries must be non-empty module names (strings), got {bad!r} in {value!r}"
    return None


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
    # gaussian: P and Q entries N(0, init_std^2), as the paper and PEFT AdaLoRA; orthonormal (beyond the paper): P with
    # orthonormal columns and Q with orthonormal rows at step 0 and unit-length expanded directions, so the regulariser
    # starts at zero and a unit of lambda moves Delta W by a unit (lambda still starts at 0: the output is unchanged)
    factor_init: str = "gaussian"
    small_init_value: float = 1e-3  # lambda given to a new direction by expand_init=small
    entropy_eps: float = 1e-8
    sensitivity_beta1: float = 0.85  # AdaLoRA's EMA factors for the sensitivity metric
    sensitivity_beta2: float = 0.85
    adapter_dtype: str = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.modules_to_save, tuple):
            self.modules_to_save = list(self.modules_to_save)
        if self.max_rank is None and _is_int(self.r):  # a bad r is reported by validate(), not by this arithmetic
            self.max_rank = math.ceil(1.5 * self.r)
        self.validate()

    def validate(self) -> None:
        """Raise InvalidConfigError listing every problem. Types are checked before any comparison, bool is not an
        integer, and numbers must be finite."""
        problems = [
            _module_names_problem("target_modules", self.target_modules, regex_allowed=True),
            _module_names_problem("modules_to_save", self.modules_to_save, regex_allowed=False),
        ]
        r_ok = _is_int(self.r) and self.r >= 1
        if not r_ok:
            problems.append(f"r must be an integer >= 1, got {self.r!r}")
        elif not _is_int(self.max_rank) or self.max_rank < self.r:
            problems.append(f"max_rank must be an integer >= r ({self.r}), got {self.max_rank!r}")
        if not _is_int(self.min_rank) or self.min_rank < 0 or (r_ok and self.min_rank > self.r):
            problems.append(f"min_rank must be an integer in [0, r={self.r!r}], got {self.min_rank!r}")
        problems += [
            _number_problem("lora_alpha", self.lora_alpha, 0.0, low_inclusive=False),
            _number_problem("lora_dropout", self.lora_dropout, 0.0, low_inclusive=True, high=1.0),
            _int_problem("b0", self.b0, 0),
            _int_problem("t_warmup", self.t_warmup, 0),
            _int_problem("t_final", self.t_final, 0),
            _int_problem("delta_t", self.delta_t, 1),
            None if self.total_steps is None else _int_problem("total_steps", self.total_steps, 1),
            None if _is_int(self.seed) else f"seed must be an integer, got {self.seed!r}",
            _number_problem("orth_reg_weight", self.orth_reg_weight, 0.0, low_inclusive=True),
            _number_problem("init_std", self.init_std, 0.0, low_inclusive=False),
            _number_problem("small_init_value", self.small_init_value, 0.0, low_inclusive=False),
            _number_problem("entropy_eps", self.entropy_eps, 0.0, low_inclusive=False),
            _number_problem("sensitivity_beta1", self.sensitivity_beta1, 0.0, low_inclusive=True, high=1.0),
            _number_problem("sensitivity_beta2", self.sensitivity_beta2, 0.0, low_inclusive=True, high=1.0),
        ]
        steps_ok = all(_is_int(v) and v >= 0 for v in (self.b0, self.t_warmup, self.t_final))
        if steps_ok and _is_int(self.total_steps) and self.total_steps >= 1:
            last = self.total_steps - self.t_final  # allocation steps are t_warmup <= t <= total_steps - t_final
            if self.t_final >= self.total_steps:
                problems.append(f"t_final ({self.t_final}) must be smaller than total_steps ({self.total_steps})")
            elif self.b0 > 0 and self.t_warmup > last:
                problems.append(
                    f"t_warmup ({self.t_warmup}) is after total_steps - t_final ({self.total_steps} - {self.t_final} = "
                    f"{last}): no allocation step would ever run and no rank would move; lower t_warmup (or t_final), "
                    "or set b0=0 to train with allocation frozen"
                )
        problems += [
            choice_problem(name, getattr(self, name), allowed)
            for name, allowed in (
                ("importance", IMPORTANCE_METRICS),
                ("mode", MODES),
                ("expand_init", EXPAND_INITS),
                ("factor_init", FACTOR_INITS),
                ("schedule", SCHEDULES),
                ("adapter_dtype", ADAPTER_DTYPES),
                ("orth_reg", ORTH_REG_FORMS),
            )
        ]
        raise_problems(self, problems)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FlexLoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in values if k not in known)  # yaml keys may be numbers, not only strings
        if unknown:
            raise ValueError(
                f"unknown FlexLoRAConfig field(s): {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
            )
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "FlexLoRAConfig":
        try:
            text = Path(path).read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"
            ) from None
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid yaml: {error}".replace("<unicode string>", str(path))) from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of FlexLoRAConfig fields, got {type(values).__name__}")
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "FlexLoRAConfig":
        return dataclasses.replace(self, **changes)
