"""The command line of the training tools: typed settings from JSON and flags, one-line errors, exit codes.

A tool's settings are a dataclass, filled from a JSON file (``--config``) and overridden by flags: every field is a
flag (``--field-name``), a ``Literal`` field takes only its values, a tuple field takes its items. The run's settings
are written beside its outputs, so a run is repeated with ``--config``.

Like ``uml``, a tool refuses bad input with one line (``python -m training.X: error: ...``) and exit code 2: the
parser's own errors, and every :class:`~umlcore.errors.UMLInputError` (a bundle that cannot be read, settings that
do not fit, a missing or unreadable file) raised while it runs (:func:`run_tool`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence, TypeVar

from umlcore.errors import UMLInputError

__all__ = ["Parser", "check_shape", "config_parser", "config_flags", "load_config", "parse_config", "read_json",
           "run_tool"]

C = TypeVar("C")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2 (``--help`` still prints the usage)."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {' '.join(str(message).split())} (see {self.prog} --help)\n")
        self.exit(2)


def read_json(path: str | Path, what: str) -> Any:
    """The JSON content of ``path``; :class:`UMLInputError` naming ``what`` it should be when it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UMLInputError(f"cannot read {path} ({exc}): give {what}") from None


def load_config(cls: type[C], path: str | Path) -> C:
    """A ``cls`` from a JSON file of its fields.

    Raises:
        UMLInputError: an unreadable file, unknown fields, or a value of the wrong type.
    """
    data = read_json(path, "a JSON object of settings")
    if not isinstance(data, dict):
        raise UMLInputError(f"the config {path} must hold a JSON object of settings")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UMLInputError(f"unknown settings {unknown} in {path}; known: {sorted(known)}")
    hints, defaults = typing.get_type_hints(cls), cls()
    values = {}
    for key, value in data.items():
        if isinstance(value, list) and typing.get_origin(hints[key]) is tuple:
            value = tuple(value)
        default = getattr(defaults, key)
        expected = float if type(default) is float else type(default)
        if typing.get_origin(hints[key]) is not Literal and not (
                isinstance(value, expected) and not isinstance(value, bool)
                or expected is float and isinstance(value, int) and not isinstance(value, bool)):
            raise UMLInputError(f"setting {key!r} in {path} must be {expected.__name__} like {default!r}, got {value!r}")
        values[key] = value
    return cls(**values)


def config_parser(cls: type, prog: str, description: str,
                  extra: Sequence[tuple[str, dict[str, Any]]] = ()) -> Parser:
    """The parser of a tool whose settings are ``cls``: ``--config``, the ``extra`` arguments, a flag per field."""
    p = Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON file of settings (flags override it)")
    for flag, kwargs in extra:
        p.add_argument(flag, **kwargs)
    config_flags(p, cls)
    return p


def parse_config(cls: type[C], argv: Optional[Sequence[str]], p: Parser,
                 saved: Optional[Callable[[argparse.Namespace], Optional[Path]]] = None) -> tuple[C, argparse.Namespace]:
    """``(settings, args)``: ``cls`` from ``--config FILE`` (else the file ``saved(args)`` names, else its defaults)
    with every flag given to ``p`` (:func:`config_parser`) applied.

    Args:
        cls: The settings dataclass.
        argv: The command line (``None``: ``sys.argv[1:]``).
        p: The tool's parser.
        saved: Where a run's own settings are, when it is continued without ``--config`` (e.g. ``--resume``).
    """
    args = p.parse_args(argv)
    fallback = None if args.config or saved is None else saved(args)
    try:
        cfg = load_config(cls, args.config or fallback) if args.config or fallback else cls()
    except UMLInputError as exc:
        p.error(str(exc))
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}
    cfg = dataclasses.replace(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    for name, hint in typing.get_type_hints(cls).items():  # modes read from a --config file are checked here
        if typing.get_origin(hint) is Literal and getattr(cfg, name) not in typing.get_args(hint):
            p.error(f"--{name.replace('_', '-')} must be one of {', '.join(map(str, typing.get_args(hint)))}, "
                    f"got {getattr(cfg, name)!r}")
    return cfg, args


def check_shape(p: Parser, flag: str, shape: Sequence[int]) -> None:
    """Refuse a case shape the generator cannot make: 3 sizes, the in-plane ones at least 16."""
    if len(shape) != 3 or min(shape) < 1 or min(shape[1:]) < 16:
        p.error(f"{flag} must be 3 sizes (slices, rows, columns), rows and columns at least 16, got {' '.join(map(str, shape))}")


def config_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of ``cls``, defaulting to ``None`` (not given)."""
    defaults = cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag, value, hint = f"--{f.name.replace('_', '-')}", getattr(defaults, f.name), hints[f.name]
        if typing.get_origin(hint) is Literal:
            p.add_argument(flag, choices=typing.get_args(hint), default=None, help=f"default {value!r}")
        elif isinstance(value, tuple):
            item = typing.get_args(hint)[0] if typing.get_args(hint) else str  # tuple[int, ...] -> int
            p.add_argument(flag, type=item, nargs="+", default=None,
                           help=f"default {' '.join(map(str, value)) or '(none)'}")
        else:
            p.add_argument(flag, type=type(value), default=None, help=f"default {value!r}")


def run_tool(main: Callable[[Optional[list[str]]], int], prog: str, argv: Optional[list[str]] = None) -> int:
    """``main(argv)`` with what a user can fix turned into one line and exit code 2 (:class:`UMLInputError`, and
    files that cannot be read or written); anything else is a bug and keeps its traceback."""
    try:
        return main(argv)
    except SystemExit as exc:  # the parser's errors (already written as one line) and --help
        return exc.code if isinstance(exc.code, int) else 0
    except (UMLInputError, OSError) as exc:
        sys.stderr.write(f"{prog}: error: {' '.join(str(exc).split())}\n")
        return 2
