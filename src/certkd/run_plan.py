"""What a ``certkd train`` / ``certkd teacher`` command line asks for, before anything runs.

A :class:`TrainRequest` is one such command as data: the preset, the values given with the
flags of the option table (:mod:`certkd.options`) and the ``--set KEY=VALUE`` items. Its
:meth:`~TrainRequest.config` is the one planning function both sides use: the command line
(:mod:`certkd.cli_train`) resolves what the user typed with it, and the reports
(:mod:`certkd.reporting.commands`) check with it that a command they write reproduces a run,
then write it with :meth:`~TrainRequest.argv`. So the library never imports the command line.
This module imports neither torch nor click.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from certkd.config import TrainConfig, parse_sets, resolve_config
from certkd.options import command_options, option


def command_overrides(flags: Mapping[str, Any], sets: Sequence[str] = ()) -> Dict[str, Any]:
    """The config values given on a command line: the flags of the option table (None: not given),
    then ``--set KEY=VALUE`` (VALUE is YAML, parsed by :func:`certkd.config.parse_sets`)."""
    values = {opt.key: flags[opt.key] for opt in command_options("train", flagged=True)
              if flags.get(opt.key) is not None}
    values.update(parse_sets(sets))
    return values


SET = "--set"  # the key of a ``--set KEY=VALUE`` item in :attr:`TrainRequest.given`


@dataclass(frozen=True)
class TrainRequest:
    """One ``certkd COMMAND`` line (COMMAND train or teacher) without its run options (--out, --resume, ...).

    ``given``: what the line gives, in its order: ``(key, value)`` for a config key given with its own
    flag (a boolean flag: True), ``(SET, "KEY=VALUE")`` for a ``--set`` item. The ``--set`` items
    override the flags wherever they stand, as on the command line.
    """

    command: str = "train"
    preset: Optional[str] = None
    given: Tuple[Tuple[str, Any], ...] = ()

    @classmethod
    def from_params(cls, command: str, params: Mapping[str, Any]) -> "TrainRequest":
        """The request of parsed command-line parameters (click's: one per config key with a flag, None
        where not given; ``preset``; ``sets``)."""
        flags = [(opt.key, params[opt.key]) for opt in command_options(command, flagged=True)
                 if params.get(opt.key) is not None]
        return cls(command, params.get("preset"), tuple(flags + [(SET, s) for s in params.get("sets") or ()]))

    def overrides(self) -> Dict[str, Any]:
        """The config values this command line gives (:func:`command_overrides`)."""
        flags = {k: v for k, v in self.given if k != SET}
        return command_overrides(flags, [v for k, v in self.given if k == SET])

    def config(self) -> TrainConfig:
        """defaults ← preset (← teacher defaults for ``certkd teacher``) ← these values, validated
        (:func:`certkd.config.resolve_config`); a one-line CertkdError for a bad value."""
        return resolve_config(self.preset, self.overrides(), teacher=self.command == "teacher")

    def argv(self) -> List[str]:
        """The words after ``certkd COMMAND``: ``--preset``, then what is given, in order (a boolean flag
        alone; a float as ``repr`` so that it reads back exactly)."""
        words: List[str] = ["--preset", str(self.preset)] if self.preset else []
        for key, value in self.given:
            if key == SET:
                words += [SET, str(value)]
            elif isinstance(value, bool):
                words += [option(key).flag] if value else []
            else:
                words += [option(key).flag, repr(value) if isinstance(value, float) else str(value)]
        return words

    def line(self, tail: Sequence[str] = ()) -> str:
        """``certkd COMMAND ARGV TAIL`` quoted for a POSIX shell."""
        return " ".join(shlex.quote(a) for a in ["certkd", self.command, *self.argv(), *tail])


def parse_sweep_command(line: str) -> Dict[str, Any]:
    """The inverse of :func:`certkd.sweep.sweep_command`: ``{"preset", "grid", "seeds", "sets"}`` of a ``certkd sweep``
    line as it wrote it (grid values as typed, which is how the run folders are named), for
    :func:`certkd.sweep.plan_sweep`. Raises ValueError for a line it did not write (another command, another flag)."""
    words = shlex.split(line)
    if words[:2] != ["certkd", "sweep"]:
        raise ValueError(f"not a certkd sweep command: {line!r}")
    plan: Dict[str, Any] = {"preset": None, "grid": [], "seeds": None, "sets": []}
    single = {"--preset": "preset", "--seeds": "seeds", "--out": None, "--eval-limit": None}
    repeated = {"--grid": "grid", "--set": "sets"}
    rest = words[2:]
    while rest:
        flag = rest.pop(0)
        if flag == "--evaluate":
            continue
        if (flag not in single and flag not in repeated) or not rest:
            raise ValueError(f"'{flag}' is not an option that certkd sweep writes with a value")
        value = rest.pop(0)
        if flag in repeated:
            plan[repeated[flag]].append(value)
        elif single[flag]:
            plan[single[flag]] = value
    return plan
