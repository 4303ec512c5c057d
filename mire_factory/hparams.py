"""Tool arguments as dataclasses, parsed once for a YAML config and for flags (LLaMA-Factory's and TRL's way).

A tool declares its arguments as one dataclass whose fields carry `metadata={"help": ...}`; transformers'
HfArgumentParser turns it into flags with every default shown in --help. A field named `config` makes the tool accept
`--config FILE`: the tool's `config_values(path, argv_values)` maps that file to field values, which become the
defaults, and flags given on the command line override them.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .io import MireInputError, problem

T = TypeVar("T")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, every flag with its default."""


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping; an unreadable or non-mapping file is an input error naming it."""
    path = Path(path)
    if not path.is_file():
        raise MireInputError(problem(path, None, None, "config file not found"))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise MireInputError(problem(path, None, None, f"not valid YAML ({type(exc).__name__})")) from None
    if not isinstance(data, dict):
        raise MireInputError(problem(path, None, None, f"expected a YAML mapping, got {type(data).__name__}"))
    return data


def parse_args(
    cls: type[T],
    argv: list[str] | None,
    description: str | None = None,
    config_values: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
) -> T:
    """The dataclass from flags, over the values `config_values` reads from --config (when the tool has one).

    config_values(config, given) gets the --config value (or None) and the flags given on the command line (raw
    strings, for the fields it needs to decide, e.g. a model directory holding saved arguments); it returns field
    values. Bad flags exit 2 with argparse's usage line."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser([cls], description=description, formatter_class=HelpFormatter)
    names = {f.name for f in dataclasses.fields(cls)}
    if config_values is not None:
        required = [action for action in parser._actions if action.required]
        for action in required:  # the config may supply them: checked in the real parse below
            action.required = False
        given, _ = parser.parse_known_args(argv)  # defaults included; only the given values are passed on
        for action in required:
            action.required = True
        explicit = {k: v for k, v in vars(given).items() if _given_on_command_line(k, argv)}
        values = config_values(explicit.get("config"), explicit)
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"config_values returned unknown fields {sorted(unknown)}")
        parser.set_defaults(**values)
        for action in parser._actions:  # a value from the config satisfies a required flag
            if action.dest in values and values[action.dest] is not None:
                action.required = False
    namespace = parser.parse_args(argv)
    return cls(**{k: v for k, v in vars(namespace).items() if k in names})


def _given_on_command_line(name: str, argv: list[str] | None) -> bool:
    import sys

    args = sys.argv[1:] if argv is None else argv
    flags = (f"--{name}", f"--{name.replace('_', '-')}")  # HfArgumentParser accepts both spellings
    return any(a in flags or a.startswith(tuple(f + "=" for f in flags)) for a in args)


def yaml_config(cls: type) -> Callable[[str | None, dict[str, Any]], dict[str, Any]]:
    """parse_args' config_values for a tool whose --config is a YAML mapping of its own flags' values (and nothing
    else: an unknown key is an input error naming the file and the key)."""
    names = {f.name for f in dataclasses.fields(cls)} - {"config"}

    def values(config: str | None, given: dict[str, Any]) -> dict[str, Any]:
        if not config:
            return {}
        data = read_yaml(config)
        unknown = sorted(str(k) for k in data if k not in names)
        if unknown:
            raise MireInputError(problem(config, None, unknown[0], f"not a flag of this tool (known: "
                                         f"{', '.join(sorted(names))})"))
        return data

    return values
