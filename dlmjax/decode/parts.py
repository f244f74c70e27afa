"""What a decode method is made of: small frozen dataclasses ("parts") registered as pytrees.

A part's tuned numbers are *traced* fields (pytree leaves: a new value reuses the compiled
program); its structure is *static* fields (in the tree structure: a new value compiles a new
program). Every field is a knob a user can set by name, in `lm.generate(..., name=value)` and as
`--name` on the CLI (both are generated from these definitions), so a field carries its help
text and, where it has one, its valid choices.

    @part
    class Threshold(Rule):
        threshold: float = traced(0.9, "commit every candidate whose confidence is >= this")

A part checks its own values (`check`, one-line `DlmjaxError`s) when a method is composed, not in
`__post_init__`: JAX rebuilds parts from tracers inside the jitted program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from dlmjax.errors import DlmjaxError


def traced(default: Any, help: str) -> Any:
    """A number tuned per call: a pytree leaf, so changing it does not recompile."""
    return dataclasses.field(default=default, metadata=dict(help=help))


def static(default: Any, help: str, choices: tuple | None = None) -> Any:
    """Structure: part of the compiled program's identity."""
    return dataclasses.field(default=default, metadata=dict(static=True, help=help, choices=choices))


def part(cls):
    """Freeze `cls` and register it as a pytree: traced fields are children, and the class with
    the static fields' values is the node's data.

    Not `jax.tree_util.register_dataclass`: the PyTreeDefs it makes for two field-less classes
    (say `Dual()` and `NoCache()`) compare equal (jax 0.10), so jit's trace cache could hand one
    cache policy's program to the other. Here the class itself is part of the node data."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    data = tuple(f.name for f in fields if not f.metadata.get("static"))
    meta = tuple(f.name for f in fields if f.metadata.get("static"))

    def flatten(p):
        return [getattr(p, n) for n in data], (cls, tuple(getattr(p, n) for n in meta))

    def unflatten(aux, children):
        return cls(**dict(zip(data, children)), **dict(zip(meta, aux[1])))

    jax.tree_util.register_pytree_node(cls, flatten, unflatten)
    return cls


class Part:
    """Base of every part: `knobs()` lists its user-settable fields, `check()` validates them."""

    name: ClassVar[str] = ""  # what users call it (rule="threshold", cache="dual", ...)

    @classmethod
    def knobs(cls) -> tuple[dataclasses.Field, ...]:
        return tuple(f for f in dataclasses.fields(cls) if "help" in f.metadata)

    def check(self) -> None:
        """Raise a one-line DlmjaxError for a value this part cannot use."""


def is_static(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("static"))


def check_choice(part_name: str, knob: str, value, choices) -> None:
    if value not in choices:
        raise DlmjaxError(f"unknown {part_name} {knob} '{value}'; use one of {', '.join(map(str, choices))}")
