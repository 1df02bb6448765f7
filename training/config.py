"""Typed settings of a tool run: a dataclass, filled from a JSON file (``--config``) and overridden by flags.

Every field of the dataclass is a flag (``--field-name``); a ``Literal`` field takes only its values; a tuple field
takes its items. The run's settings are written beside its outputs, so a run is repeated with ``--config``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence, TypeVar

__all__ = ["load_config", "parse_config", "config_flags"]

C = TypeVar("C")


def load_config(cls: type[C], path: str | Path) -> C:
    """A ``cls`` from a JSON file of its fields (unknown fields are refused)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot read the config {path} ({exc}): give a JSON file of settings") from None
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SystemExit(f"error: unknown settings {unknown} in {path}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: tuple(v) if isinstance(v, list) and typing.get_origin(hints[k]) is tuple else v
                  for k, v in data.items()})


def parse_config(cls: type[C], argv: Optional[Sequence[str]], description: str,
                 extra: Sequence[tuple[str, dict[str, Any]]] = (),
                 saved: Optional[Callable[[argparse.Namespace], Optional[Path]]] = None) -> tuple[C, argparse.Namespace]:
    """``(settings, args)``: ``cls`` from ``--config FILE`` (else the file ``saved(args)`` names, else its defaults)
    with every given flag applied; ``args.parser`` is the parser (for ``error``).

    Args:
        cls: The settings dataclass.
        argv: The command line (``None``: ``sys.argv[1:]``).
        description: The tool's ``--help`` text.
        extra: More arguments as ``(flag, argparse keywords)`` (returned in ``args``).
        saved: Where a run's own settings are, when it is continued without ``--config`` (e.g. ``--resume``).
    """
    p = argparse.ArgumentParser(prog=f"python -m {cls.__module__}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON file of settings (flags override it)")
    for flag, kwargs in extra:
        p.add_argument(flag, **kwargs)
    config_flags(p, cls)
    args = p.parse_args(argv)
    fallback = None if args.config or saved is None else saved(args)
    cfg = load_config(cls, args.config or fallback) if args.config or fallback else cls()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}
    hints = typing.get_type_hints(cls)
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    cfg = dataclasses.replace(cfg, **overrides)
    for name, hint in hints.items():  # modes read from a --config file are checked here
        if typing.get_origin(hint) is Literal and getattr(cfg, name) not in typing.get_args(hint):
            p.error(f"--{name.replace('_', '-')} must be one of {', '.join(map(str, typing.get_args(hint)))}, "
                    f"got {getattr(cfg, name)!r}")
    args.parser = p
    return cfg, args


def config_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of ``cls``, defaulting to ``None`` (not given)."""
    defaults = cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag, value, hint = f"--{f.name.replace('_', '-')}", getattr(defaults, f.name), hints[f.name]
        if typing.get_origin(hint) is Literal:
            p.add_argument(flag, choices=typing.get_args(hint), default=None, help=f"default {value!r}")
        elif isinstance(value, tuple):
            p.add_argument(flag, type=type(value[0]) if value else str, nargs="+", default=None,
                           help=f"default {' '.join(map(str, value))}")
        else:
            p.add_argument(flag, type=type(value), default=None, help=f"default {value!r}")
