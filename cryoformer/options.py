"""Declaring an option once: a dataclass field whose metadata says how it is given and kept.

An option is a field of a frozen dataclass made with :func:`option`; its metadata carries the
command-line flag(s), the help text, the unit, the allowed values, and what a resumed run does
with it (:data:`MUST_MATCH`, :data:`MAY_CHANGE`, :data:`FROM_RUN`), plus — for an option added
after runs were saved — the value a saved config that lacks it behaved as. Configs nest: a
field made with :func:`option_group` holds another such dataclass, one section of the help.

From those declarations this module derives everything else: the argparse arguments
(:func:`add_arguments`), the values the user gave (:func:`given_values`), the flat dict a config
is saved as (:func:`to_flat`) and the config built back from it (:func:`from_flat`), the saved
values an older config implies (:func:`with_legacy_values`), and resume checks
(:func:`resume_mismatches`, :func:`kept_from_run`). Flat names are the leaf field names, so they
must be unique across the groups of one config.

>>> @dataclass(frozen=True)
... class Schedule:
...     epochs: int = option("--epochs", default=20, help="training epochs (default {default})")
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Optional

# What a resumed run does with an option.
MUST_MATCH = "must_match"  # it changes the result: the checkpoint's value must be given again
MAY_CHANGE = "may_change"  # schedule, budget, device: may differ between the pieces of a run
FROM_RUN = "from_run"      # part of the run (e.g. its held-out split): the saved value is kept
RESUME_POLICIES = (MUST_MATCH, MAY_CHANGE, FROM_RUN)

_SPEC = "cryoformer.option"
_GROUP = "cryoformer.option_group"


class _NoLegacy:
    """Marks an option that every saved config records (nothing to fill in)."""

    def __repr__(self) -> str:
        return "NO_LEGACY"


NO_LEGACY = _NoLegacy()


@dataclass(frozen=True)
class OptionSpec:
    """How one option is given on the command line and kept across a resume.

    Attributes
    ----------
    flags : tuple of str
        Argparse names (``("--box",)``, ``("-b", "--batch-size")``, ``("particles",)`` for a
        positional); empty = not on the command line.
    help : str
        Help text; ``{default}`` is replaced by the field's default (format specs allowed).
    unit : str or None
        Unit of the value (``"px"``, ``"deg"``, ``"min"``); the value's name in ``--help``
        (``--box PX``) unless ``metavar`` is given.
    choices : tuple or None
        Allowed values (argparse ``choices``).
    resume : str
        One of :data:`RESUME_POLICIES`.
    legacy : object
        Value a saved config without this key behaved as; :data:`NO_LEGACY` when none.
    legacy_if : str or None
        Flat name of a boolean option: the legacy value applies only where the saved config
        has it true (an option that only mattered when a feature was on).
    metavar : str or None
    switch : {"store_true", "store_false"} or None
        For a boolean option: the flag sets True (``store_true``) or False (``store_false``).
    nargs : str or None
        Argparse ``nargs`` (``"?"`` for an optional positional).
    required : bool
        The flag must be given (argparse ``required``).
    """

    flags: tuple[str, ...] = ()
    help: str = ""
    unit: Optional[str] = None
    choices: Optional[tuple] = None
    resume: str = MAY_CHANGE
    legacy: Any = NO_LEGACY
    legacy_if: Optional[str] = None
    metavar: Optional[str] = None
    switch: Optional[str] = None
    nargs: Optional[str] = None
    required: bool = False

    def __post_init__(self) -> None:
        if self.resume not in RESUME_POLICIES:
            raise ValueError(f"resume policy must be one of {RESUME_POLICIES}, got {self.resume!r}")


def option(*flags: str, default: Any = dataclasses.MISSING, **spec: Any) -> Any:
    """A dataclass field declaring an option given by ``flags`` (none: not on the command
    line); ``spec`` are the other :class:`OptionSpec` attributes."""
    return dataclasses.field(default=default, metadata={_SPEC: OptionSpec(flags=flags, **spec)})


def option_group(cls: type, title: Optional[str] = None) -> Any:
    """A dataclass field holding a group of options (one help section, titled ``title``;
    None = the command's main options). It defaults to ``cls()`` when every option has a default."""
    required = any(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   for f in dataclasses.fields(cls))
    meta = {_GROUP: title}
    return dataclasses.field(metadata=meta) if required else dataclasses.field(default_factory=cls, metadata=meta)


@dataclass(frozen=True)
class Leaf:
    """One option of a config class: its flat name, field, resolved type and spec."""

    name: str
    field: dataclasses.Field
    type: Any
    spec: OptionSpec


def _is_group(f: dataclasses.Field) -> bool:
    return _GROUP in f.metadata


def groups(cls: type, title: Optional[str] = None) -> Iterator[tuple[Optional[str], type, list[Leaf]]]:
    """``(title, group class, its leaves)`` for ``cls`` itself (its direct options, if any,
    under ``title``) and every nested group, depth first, in declaration order; an untitled
    nested group takes the title of the one that holds it."""
    hints = typing.get_type_hints(cls)
    own = [Leaf(f.name, f, hints[f.name], f.metadata.get(_SPEC, OptionSpec()))
           for f in dataclasses.fields(cls) if not _is_group(f)]
    if own:
        yield title, cls, own
    for f in dataclasses.fields(cls):
        if _is_group(f):
            yield from groups(hints[f.name], f.metadata[_GROUP] or title)


def leaves(cls: type) -> list[Leaf]:
    """Every option of ``cls``, nested groups included, in declaration order."""
    found = [leaf for _, _, group_leaves in groups(cls) for leaf in group_leaves]
    names = [leaf.name for leaf in found]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TypeError(f"{cls.__name__}: option names must be unique across groups, repeated: {dup}")
    return found


def _value_type(annotation: Any) -> Any:
    """``Optional[X]`` → ``X``; other annotations as they are."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation


def _argument(section, leaf: Leaf) -> None:
    spec, default = leaf.spec, leaf.field.default
    shown = default if default is not dataclasses.MISSING else None
    kwargs: dict[str, Any] = {"help": spec.help.format(default=shown)}
    positional = not spec.flags[0].startswith("-")
    if not positional and spec.flags[-1].lstrip("-").replace("-", "_") != leaf.name:
        kwargs["dest"] = leaf.name
    if spec.switch is not None:
        kwargs.update(action=spec.switch, default=None)
    else:
        value_type = _value_type(leaf.type)
        if value_type in (int, float):
            kwargs["type"] = value_type
        for key in ("choices", "metavar", "nargs"):
            if getattr(spec, key) is not None:
                kwargs[key] = getattr(spec, key)
        if spec.metavar is None and spec.unit is not None and spec.choices is None:
            kwargs["metavar"] = spec.unit.upper()  # the unit names the value: --box PX, --max-minutes MIN
        if spec.required:
            kwargs["required"] = True
    section.add_argument(*spec.flags, **kwargs)


def add_arguments(parser: argparse.ArgumentParser, cls: type, title: Optional[str] = None) -> None:
    """Add the command-line options of ``cls`` to ``parser``, one argument group per titled
    option group (``title``: that of ``cls``'s own options; None = the main section). Every
    argument defaults to None, so :func:`given_values` can tell what was given; the config's
    defaults fill the rest."""
    sections: dict[Optional[str], Any] = {None: parser}
    for group_title, _, group_leaves in groups(cls, title):
        for leaf in group_leaves:
            if leaf.spec.flags:
                if group_title not in sections:
                    sections[group_title] = parser.add_argument_group(group_title)
                _argument(sections[group_title], leaf)


def given_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """Flat ``{name: value}`` of the options of ``cls`` given on the command line."""
    return {leaf.name: getattr(args, leaf.name) for leaf in leaves(cls)
            if leaf.spec.flags and getattr(args, leaf.name, None) is not None}


def to_flat(config: Any) -> dict[str, Any]:
    """A nested config as the flat ``{name: value}`` dict of its options."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out.update(to_flat(value) if _is_group(f) else {f.name: value})
    return out


def from_flat(cls: type, values: dict[str, Any]) -> Any:
    """Build ``cls`` (and its groups) from flat ``{name: value}``; missing names take their
    defaults. Raises TypeError for a name that is no option of ``cls``, as a constructor does."""
    unknown = sorted(set(values) - {leaf.name for leaf in leaves(cls)})
    if unknown:
        raise TypeError(f"{cls.__name__} has no option {', '.join(unknown)}")
    return _build(cls, values)


def _build(cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if _is_group(f):
            kwargs[f.name] = _build(hints[f.name], values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def nested_to_flat(cls: type, saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config in either form — flat ``{name: value}`` or nested by group field —
    as the flat dict; keys that are no option of ``cls`` are dropped (newer or retired ones)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if _is_group(f) and isinstance(saved.get(f.name), dict):
            out.update(nested_to_flat(hints[f.name], saved[f.name]))
    names = {leaf.name for leaf in leaves(cls)}
    out.update({k: v for k, v in saved.items() if k in names})
    return out


def with_legacy_values(cls: type, saved: dict[str, Any]) -> dict[str, Any]:
    """A flat saved config with the options it predates filled in as it behaved."""
    out = dict(saved)
    for leaf in leaves(cls):
        spec = leaf.spec
        if (leaf.name not in out and spec.legacy is not NO_LEGACY
                and (spec.legacy_if is None or saved.get(spec.legacy_if))):
            out[leaf.name] = spec.legacy
    return out


def resume_mismatches(cls: type, mine: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """Flat names of :data:`MUST_MATCH` options whose value in ``mine`` differs from a saved
    flat config (options the saved one neither records nor implies are not compared)."""
    saved = with_legacy_values(cls, saved)
    return [leaf.name for leaf in leaves(cls) if leaf.spec.resume == MUST_MATCH
            and leaf.name in saved and saved[leaf.name] != mine[leaf.name]]


def kept_from_run(cls: type, saved: dict[str, Any]) -> dict[str, Any]:
    """The :data:`FROM_RUN` options a resumed run keeps: the saved (or legacy) values; options
    the saved config neither records nor implies keep the caller's value (not listed)."""
    saved = with_legacy_values(cls, saved)
    return {leaf.name: saved[leaf.name] for leaf in leaves(cls)
            if leaf.spec.resume == FROM_RUN and leaf.name in saved}
