"""Recipe configs: a yaml file read into typed dataclasses, ``key=value`` command-line overrides (dotted keys for
nested sections), strict type checks with the offending key named, the resolved config as yaml, and the sections
every recipe shares."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from flexlora.config import FlexLoRAConfig
from flexlora.errors import UserError

from .sources import ConfigSources, dotted_keys, remember, user_message


class ConfigError(UserError):
    """A config file or override the recipe cannot run with; the message names the key or file, ``fields`` the
    dotted keys it is about (``run_recipe`` says where each came from)."""


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
            if value is None and dataclasses.is_dataclass(hints[f.name]):  # a section without defaults: the yaml's
                lines.append(f"  [{prefix}{f.name}] (required: the yaml file gives it)")
                walk(hints[f.name], f"{prefix}{f.name}.", _defaults(hints[f.name]))
            elif dataclasses.is_dataclass(value):
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
                f"unexpected argument {arg!r} on the command line: give --config <file.yaml> and key=value "
                "overrides (--help lists the keys)"
            )
    if config_path is None:
        raise ConfigError(f"missing --config <file.yaml>; {USAGE.format(prog=prog)}")
    return config_path, overrides


def run_recipe(main: Callable[[list[str] | None], Any], option_names: dict[str, str] | None = None) -> None:
    """A recipe's ``if __name__ == "__main__"``: a user error (anything caused by what the user typed or pointed at,
    ``flexlora.errors.UserError``, raised anywhere from reading the config to the first step) ends the run with its
    message on one line, saying where each named setting came from, and exit status 2 instead of a traceback.

    ``option_names`` is for a program whose command line has options instead of config keys (``eval.commonsense``):
    a setting the message names, dotted (``model.path``) or as its section's bare field (``limit``) at the start, is
    called by the option the user typed (``--base``, ``--limit``)."""
    try:
        main(None)
    except (UserError, FileNotFoundError) as error:  # FileNotFoundError: a path the user named, refused by a library
        print(f"error: {with_option_names(user_message(error), option_names or {})}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingStopped as stopped:  # the model diverged: not the user's input, but nothing to debug in a traceback
        print(f"error: {stopped}", file=sys.stderr)
        raise SystemExit(1) from None


def with_option_names(message: str, option_names: dict[str, str]) -> str:
    """``message`` with each setting of ``option_names`` called by its option: the dotted key anywhere (not inside a
    path or a longer key), the bare field where one of the message's problems (joined by "; ") starts with it."""
    for key, option in option_names.items():
        message = re.sub(rf"(?<![\w./-]){re.escape(key)}(?!\w|\.\w)", option, message)
        bare = key.rsplit(".", 1)[-1]
        message = re.sub(rf"(^|; ){re.escape(bare)}(?=[ :])", rf"\g<1>{option}", message)
    return message


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` into a nested dict; the value is parsed as yaml (so ``[q,v]``, ``null``, ``true`` work)."""
    values = copy.deepcopy(values)  # values yaml reads but no field takes (dates, binary) are refused, by key, later
    for item in overrides:
        key, _, raw = item.partition("=")
        if not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise ConfigError(
                f"bad override {item!r} on the command line: expected key=value with a dotted key such as train.lr=1e-4"
            )
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(
                f"override {item!r} on the command line: value is not valid yaml: {_yaml_message(e, 'the value')}"
            ) from None
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} on the command line: {part} is a value, not a section")
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
            raise ConfigError(f"{where}: null is not allowed (expected {_type_name(tp)})", [where])
        choices = [member for member in members if member is not type(None)]
        if len(choices) == 1:  # X | None: X's own message says more (e.g. "expected a finite number")
            return _coerce(value, choices[0], where)
        for member in choices:
            try:
                return _coerce(value, member, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}", [where])
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: must be one of {list(typing.get_args(tp))}, got {value!r}", [where])
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}", [where])
        return build_dataclass(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}", [where])
        (item_type,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}", [where])
        key_type, value_type = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_type, where): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}", [where])
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}", [where])
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
            raise ConfigError(f"{where}: expected a number, got {value!r}", [where])
        if not math.isfinite(number):  # .inf, .nan, "1e999": no setting means that
            raise ConfigError(f"{where}: expected a finite number, got {value!r}", [where])
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}", [where])
        return value
    raise ConfigError(f"{where}: unsupported config type {tp!r}", [where])


def build_dataclass(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build ``cls`` from a nested dict: unknown keys, wrong types and missing required keys are errors."""
    hints = typing.get_type_hints(cls)
    fields_ = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    unknown = sorted(str(k) for k in values if k not in fields_)  # yaml keys may be numbers or null, not only strings
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)}; known: {', '.join(sorted(fields_))}",
            [prefix + k for k in unknown],
        )
    kwargs, problems = {}, []
    for name in fields_:  # every given value is checked, so one run reports all the sections' problems at once
        if name in values:
            try:
                kwargs[name] = _coerce(values[name], hints[name], prefix + name)
            except ConfigError as e:
                problems.append(e)
    if problems:
        raise ConfigError("; ".join(str(e) for e in problems), [key for e in problems for key in e.fields])
    missing = [
        prefix + name
        for name, f in fields_.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:  # after the given values' own checks, which say more about a broken file than what it lacks
        raise ConfigError(f"missing required key(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        problems = getattr(e, "problems", None)  # e.g. flexlora.config.InvalidConfigError: each names its field
        if problems:  # a section's problems name its fields (prefixed here); the top level's name dotted keys
            fields = [key for problem in problems for key in _fields_named(problem, fields_, prefix)]
            raise ConfigError("; ".join(prefix + problem for problem in problems), fields) from e
        fields = _fields_named(str(e), fields_, prefix)
        text = " ".join(str(e).split())
        raise ConfigError(text if fields and not where else f"{where or cls.__name__}: {text}", fields) from e


def _fields_named(message: str, fields_: dict, prefix: str) -> list[str]:
    """The dotted keys a section's own check names: its first word (``gguf_file is empty``, ``model.gguf_file is
    empty``) and any ``name=value`` it quotes (``source=hub``), where they are fields of the section."""
    first = re.split(r"[\s:=]", message.strip(), maxsplit=1)[0].removeprefix(prefix)
    quoted = re.findall(r"(?<![\w.])(?:" + re.escape(prefix) + r")?(\w+)=", message) if prefix else []
    names = [first, *quoted]
    return list(dict.fromkeys(prefix + name for name in names if name.split(".")[0] in fields_))


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
    """``cls`` from a yaml file and ``key=value`` overrides. Every problem is a ConfigError naming the key and where
    its value came from (the file or the command line), or the file: a missing, unreadable, non-UTF-8, empty or
    malformed file, a key given twice, an unknown key, a wrong type, a value out of range. Where each setting came
    from stays recorded for the errors raised after loading (``run_recipe``)."""
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
            f"config file {path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}: {e.reason}); "
            "save it as UTF-8"
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
    sources = ConfigSources(
        path=path,
        overrides={item.partition("=")[0]: item for item in overrides or []},
        in_file=dotted_keys(values),
        library_section=next((name for name, tp in typing.get_type_hints(cls).items() if tp is FlexLoRAConfig), None),
    )
    remember(sources)
    merged = apply_overrides(values, overrides or [])  # its errors name the override, not the file
    try:
        return build_dataclass(cls, merged)
    except ConfigError as e:
        if e.fields:  # where each named value came from: the file or the command line
            raise ConfigError(f"{e}{sources.note(e.fields)}", e.fields) from None
        raise ConfigError(f"{path}: {e}") from None


def check_writable_folder(path: Path, key: str) -> None:
    """Refuse a folder setting (``output_dir``) that names a file, lies under a file, or cannot be written: a
    ConfigError naming the key, before the run starts rather than at its first write."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise ConfigError(f"{key} {path} {where}, not a folder: choose a folder to write the run to", [key])
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} {path}: {existing} is not writable (permission denied)", [key])


def config_to_yaml(config: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, default_flow_style=None, width=120)
