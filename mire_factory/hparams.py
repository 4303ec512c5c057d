"""Tool arguments as dataclasses, parsed once for a YAML config and for flags (LLaMA-Factory's hparams, TRL's TrlParser).

A tool declares its arguments as one dataclass whose fields carry `metadata={"help": ...}` (and, where argparse needs
more, "choices", "aliases", or "action": "extend" for a flag that may be repeated); transformers' HfArgumentParser
turns it into flags with every default shown in --help. Checks that need several fields go in the dataclass'
`__post_init__` (raising ValueError, as LLaMA-Factory's hparams do).

A field `config` (`config_field()`) makes the tool accept `--config FILE`: a YAML mapping of the tool's own flags'
values (`yaml_config`), or what the tool's own `config_values` reads (tools.vllm_infer: a recipe or a trained
model's directory). Config values become the defaults, checked as flags are (type, choices); flags given on the
command line override them. Every problem (an unknown flag, a bad value or key, a refused combination) is one line of
MireInputError, which run_cli prints before exiting 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .io import MireInputError, problem

T = TypeVar("T")
ConfigValues = Callable[[str | None, dict[str, Any]], dict[str, Any]]
CONFIG_HELP = "a YAML file of these flags' values (keys as the flags, without --); flags given override it"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, every flag with its default."""


def config_field(help: str = CONFIG_HELP) -> Any:
    """The `config` field that gives a tool --config."""
    return dataclasses.field(default=None, metadata={"help": help})


@lru_cache(maxsize=1)
def _parser_class() -> type:
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str):  # argparse prints its usage and exits; our tools answer with one line
            raise MireInputError(f"{message} (--help lists the flags)")

    return Parser


def make_parser(cls: type, description: str | None = None, **kwargs) -> argparse.ArgumentParser:
    return _parser_class()([cls], description=description, formatter_class=HelpFormatter, **kwargs)


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


def parse_args(cls: type[T], argv: list[str] | None, description: str | None = None,
               config_values: ConfigValues | None = None) -> T:
    """The dataclass from flags, over the values read from --config (when the tool has a `config` field).

    config_values(config, given) gets the --config value (or None) and the flags given on the command line (parsed,
    for the fields it needs to decide, e.g. a model directory holding saved arguments); it returns field values.
    Without it, a `config` field means yaml_config."""
    parser = make_parser(cls, description)
    names = {f.name for f in dataclasses.fields(cls)}
    if config_values is None and "config" in names:
        config_values = yaml_config(cls)
    if config_values is not None:
        given = given_flags(cls, argv)
        values = config_values(given.get("config"), given)
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"config_values returned unknown fields {sorted(unknown)}")
        source = given.get("config") or "--config"
        optional = _optional_fields(cls)
        values = {k: _coerce(parser, k, v, source, k in optional) for k, v in values.items() if k not in given}
        parser.set_defaults(**values)
        for action in parser._actions:  # a value from the config satisfies a required flag
            if action.dest in values and values[action.dest] is not None:
                action.required = False
    namespace = parser.parse_args(argv)
    try:
        return cls(**{k: v for k, v in vars(namespace).items() if k in names})
    except ValueError as exc:  # __post_init__ refusing a combination of values
        raise MireInputError(str(exc).splitlines() or [type(exc).__name__]) from None


def given_flags(cls: type, argv: list[str] | None) -> dict[str, Any]:
    """The fields set on the command line (as parsed; abbreviations and --no_X included), nothing else; {} when the
    command line does not parse (the real parse reports why)."""
    probe = make_parser(cls, add_help=False, exit_on_error=False)
    for action in probe._actions:
        action.default, action.required = argparse.SUPPRESS, False
    try:
        namespace, _ = probe.parse_known_args(argv)
    except (argparse.ArgumentError, MireInputError):
        return {}
    return vars(namespace)


def _optional_fields(cls: type) -> set[str]:
    hints = typing.get_type_hints(cls)
    return {f.name for f in dataclasses.fields(cls)
            if f.default is None or type(None) in typing.get_args(hints.get(f.name))}


def _coerce(parser: argparse.ArgumentParser, name: str, value: Any, source: str, optional: bool) -> Any:
    """A config value converted and checked as the same text on the command line would be."""
    action = next(a for a in parser._actions if a.dest == name and f"--{name}" in a.option_strings)

    def refuse(message: str):
        raise MireInputError(problem(source, None, name, message))

    def one(item: Any) -> Any:
        if isinstance(item, (list, dict)) or item is None:
            refuse(f"expected a single value, got {item!r}"[:300])
        text = ("true" if item else "false") if isinstance(item, bool) else str(item)
        try:
            converted = parser._get_value(action, text)
            parser._check_value(action, converted)
        except argparse.ArgumentError as exc:
            refuse(exc.message)
        return converted

    if value is None:
        if not optional:
            refuse("needs a value (null given)")
        return None
    if action.nargs in ("+", "*"):
        return [one(item) for item in (value if isinstance(value, list) else [value])]
    return one(value)


def yaml_config(cls: type) -> ConfigValues:
    """parse_args' config_values for a tool whose --config is a YAML mapping of its own flags' values (and nothing
    else: an unknown key is an input error naming the file and the key). A flag's alias is a key too."""
    keys = {f.name: f.name for f in dataclasses.fields(cls) if f.name != "config"}
    for f in dataclasses.fields(cls):
        aliases = f.metadata.get("aliases", [])
        for alias in [aliases] if isinstance(aliases, str) else aliases:
            keys[alias.lstrip("-")] = f.name

    def values(config: str | None, given: dict[str, Any]) -> dict[str, Any]:
        if not config:
            return {}
        data = read_yaml(config)
        unknown = sorted(str(k) for k in data if k not in keys)
        if unknown:
            raise MireInputError(problem(config, None, unknown[0], f"not a flag of this tool (known: "
                                         f"{', '.join(sorted(keys))})"))
        return {keys[k]: v for k, v in data.items()}

    return values
