"""Where each setting of a recipe's config came from (the yaml file, a ``key=value`` override on the command line,
or the recipe's defaults), and a user error as the one line a recipe prints: the fields it names, with their origin."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from flexlora.config import FlexLoRAConfig


@dataclasses.dataclass
class ConfigSources:
    """Where each setting of a loaded config came from: the yaml file, a ``key=value`` override, or the recipe's
    defaults. ``load_config`` records it so that errors raised later (``run_recipe``) can say so too."""

    path: Path
    overrides: dict[str, str]  # dotted key -> the override as typed
    in_file: set[str]  # dotted keys (sections too) the yaml file sets
    library_section: str | None  # the section holding the FlexLoRAConfig, whose errors name bare fields ("r")

    def key(self, field: str) -> str:
        """The dotted key of ``field``: as given, or a bare FlexLoRAConfig field in its section (``r`` ->
        ``adapter.r``)."""
        field = re.sub(r"\[.*", "", field)  # eval.tasks[0] -> eval.tasks
        if "." not in field and self.library_section and field in _FLEXLORA_FIELDS:
            return f"{self.library_section}.{field}"
        return field

    def origin(self, key: str) -> str | None:
        """``adapter.r=64, from the command line`` or ``adapter.r in x.yaml``; None for the recipe's default."""
        for given, typed in reversed(self.overrides.items()):  # the last override of a key wins
            if given == key or key.startswith(given + ".") or given.startswith(key + "."):
                return f"{typed}, from the command line"
        return f"{key} in {self.path}" if key in self.in_file else None

    def note(self, fields: tuple[str, ...]) -> str:
        """`` (adapter.r=64, from the command line; ...)`` for the fields an error names; empty for none. Fields left
        at the recipe's default are mentioned only when no named field was set (``max_rank`` follows ``r``)."""
        keys = list(dict.fromkeys(self.key(field) for field in fields))
        given = [origin for origin in map(self.origin, keys) if origin is not None]
        if given:
            return f" ({'; '.join(given)})"
        return f" ({', '.join(keys)}: the recipe's default, not set in {self.path})" if keys else ""


_FLEXLORA_FIELDS = {f.name for f in dataclasses.fields(FlexLoRAConfig)}
_loaded: ConfigSources | None = None  # the sources of the config load_config read last (one per process)


def remember(sources: ConfigSources) -> None:
    """Record where the settings of the config just loaded came from, for the errors raised after loading."""
    global _loaded
    _loaded = sources


def user_message(error: BaseException, sources: ConfigSources | None = None) -> str:
    """A user error as one line. Problems that name a bare library field get their section (``t_warmup ...`` ->
    ``adapter.t_warmup ...``), and the fields the error names get where their values came from (the command line
    or the yaml file), once."""
    sources = sources or _loaded
    problems = getattr(error, "problems", None)  # flexlora.config.InvalidConfigError: one message per field
    fields = getattr(error, "fields", ())
    if problems and sources is not None:
        text = "; ".join(
            sources.key(problem.split(" ", 1)[0]) + " " + problem.split(" ", 1)[1] if " " in problem else problem
            for problem in problems
        )
    else:
        text = "; ".join(problems) if problems else str(error)
    if sources is not None and fields:
        note = sources.note(fields)
        if note not in text:  # load_config's errors carry it already
            text += note
    return " ".join(text.split())


def dotted_keys(values: dict, prefix: str = "") -> set[str]:
    """Every key of a nested mapping as a dotted path, sections included (``train``, ``train.lr``)."""
    keys = set()
    for key, value in values.items():
        keys.add(f"{prefix}{key}")
        if isinstance(value, dict):
            keys |= dotted_keys(value, f"{prefix}{key}.")
    return keys
