"""A decode method as a value: a commit rule, a block schedule, an exit rule, a cache policy.

`Method` is a frozen pytree (`dlmjax.decode.parts`): the jitted decode takes it as an
argument, its static fields and part classes are the compiled program's structure, its traced
fields (thresholds, temperature, schedule ends) are arrays, so a new value reuses the program.

`compose` builds one from flat knobs, the way `lm.generate(method="fast-dllm", threshold=0.8)`
and the CLI name them: the selectors `rule`, `schedule`, `cache` and `attention` pick the parts,
every other knob goes to the one chosen part that has a field of that name, and a knob that no
chosen part has is refused (never silently ignored). The knob names, their help and the CLI
flags all come from the parts' fields (`knob_table`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from dlmjax.decode import caches, exits, rules, schedules
from dlmjax.decode.caches import Cache, NoCache
from dlmjax.decode.exits import Exit
from dlmjax.decode.parts import Part, part, static, traced
from dlmjax.decode.rules import Rule
from dlmjax.decode.schedules import Pipeline, Schedule, SemiAR
from dlmjax.errors import DlmjaxError

ATTENTIONS = ("bidirectional", "block_causal", "prompt_block_causal")


@part
class CFG(Part):
    """LLaDA's unsupervised classifier-free guidance: a second, prompt-masked pass per step."""

    name: ClassVar[str] = "cfg"
    cfg_scale: float = traced(0.0, "LLaDA classifier-free guidance scale (0 = off)")

    def check(self) -> None:
        if self.cfg_scale < 0:
            raise DlmjaxError(f"cfg_scale {self.cfg_scale} is negative; use 0 (off) or a positive scale")


@part
class Method(Part):
    rule: Rule
    blocks: Schedule
    exit: Exit | None = None
    cache: Cache = NoCache()
    guidance: CFG | None = None
    attention: str = static("bidirectional", "attention over the canvas: bidirectional, or block-causal with blocks "
                            "from position 0 (block_causal) or from the prompt's end (prompt_block_causal, D2F)",
                            choices=ATTENTIONS)
    temperature: float = traced(0.0, "Gumbel-max sampling temperature (0 = greedy)")
    gumbel_x64: bool = static(False, "LLaDA's exact float64 Gumbel noise")
    stop_at_eos: bool = static(False, "a row is done once everything up to its first stop token (EOS) is committed")
    logits_eos_inf: bool = static(False, "EOS is never predicted (its logit is -inf)")
    confidence_eos_eot_inf: bool = static(False, "EOS and end-of-turn predictions are never committed by confidence")

    # the engine's view
    @property
    def gen_length(self) -> int:
        return self.blocks.gen_length

    @property
    def canvas_length(self) -> int:
        """The generation region the decode carries (LLaDA2's blocks decode the last block whole,
        past gen_length); the output keeps its first gen_length positions."""
        return getattr(self.blocks, "canvas_length", self.gen_length)

    @property
    def block_length(self) -> int:
        return self.blocks.block_length

    @property
    def steps(self) -> int:
        """SemiAR's step budget; a pipeline's upper bound (one token a forward at least)."""
        return getattr(self.blocks, "steps", self.gen_length)

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    @property
    def steps_per_block(self) -> int:
        return getattr(self.blocks, "steps_per_block", self.block_length)

    @property
    def needs(self) -> frozenset[str]:
        return self.rule.needs | (self.exit.needs if self.exit is not None else frozenset())

    def check(self) -> None:
        for p in (self.rule, self.blocks, self.exit, self.cache, self.guidance):
            if p is not None:
                p.check()
        if self.attention not in ATTENTIONS:
            raise DlmjaxError(f"unknown attention '{self.attention}'; use one of {', '.join(ATTENTIONS)}")
        if self.temperature < 0:
            raise DlmjaxError(f"temperature {self.temperature} is negative; use 0 for greedy decoding or a positive value")
        if self.cache.exact and self.attention == "bidirectional":
            raise DlmjaxError("cache='block' is exact only under block-causal attention; pass attention='prompt_block_causal' "
                              "or 'block_causal', or use cache='prefix' or 'dual'")
        if not isinstance(self.blocks, SemiAR):
            what = self.blocks.title
            if self.rule.fixed_steps:
                raise DlmjaxError(f"rule '{self.rule.name}' runs a fixed number of steps per block, which {what} does "
                                  "not have; use rule 'd2f', 'threshold', 'factor' or 'entropy'")
            if self.exit is not None or self.guidance is not None:
                raise DlmjaxError(f"{what} takes no early-exit schedule and no cfg_scale; drop them")
            allowed = ("none", "block", "dual") if self.blocks.has_sub_blocks else ("none", "block")
            if self.cache.name not in allowed:
                raise DlmjaxError(f"{what} takes cache={' or '.join(repr(c) for c in allowed)}, not '{self.cache.name}'")
        if isinstance(self.rule, rules.QuotaThreshold) and not isinstance(self.blocks, schedules.Aligned):
            raise DlmjaxError("rule 'quota_threshold' takes its quotas from LLaDA2's blocks; use method='llada2' (blocks='aligned')")
        if isinstance(self.rule, rules.Editing) != isinstance(self.blocks, schedules.Editing):
            raise DlmjaxError("LLaDA2.1's token editing takes rule 'editing' with blocks 'editing' together; use method='llada2.1'")
        if isinstance(self.rule, rules.D2F) and not isinstance(self.blocks, Pipeline):
            raise DlmjaxError("rule 'd2f' needs D2F's pipeline of blocks; use method='d2f' (blocks='d2f')")
        if isinstance(self.rule, rules.Dream) and (self.guidance is not None or self.gumbel_x64):
            raise DlmjaxError("cfg_scale and gumbel_x64 belong to LLaDA's sampler; drop them for rule 'dream'")
        if self.cache.stores and (isinstance(self.rule, rules.Dream) or self.guidance is not None):
            raise DlmjaxError(
                f"cache='{self.cache.name}' works with the quota, threshold, factor and entropy rules without CFG; use cache='none'"
            )

    def traced(self) -> "Method":
        """The same method with every traced field a float32 array (stable avals for the compiled program)."""
        return jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float32), self)

    def structure(self):
        """What compiles, as a hashable key: the tree structure, i.e. every part's class and static
        fields (`parts.part` puts the class in the node data, so two cache policies never share it)."""
        return jax.tree_util.tree_structure(self)


# Every knob users can set, by the part kind that has it. The selectors pick the parts.
SELECTORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "rule": ("commit rule", tuple(rules.RULES)),
    "schedule": ("early-exit schedule (SchED / Prophet)", tuple(exits.EXITS)),
    "cache": ("KV cache", tuple(caches.CACHES)),
    "blocks": ("block schedule", tuple(schedules.SCHEDULES)),
}


def _owners() -> list[tuple[str, type[Part]]]:
    """(what users call the owner, part class) for every class that has knobs."""
    owners: list[tuple[str, type[Part]]] = [(f"rule '{name}'", cls) for name, cls in rules.RULES.items()]
    owners += [(f"schedule '{name}'", cls) for name, (cls, _) in exits.EXITS.items()]
    owners += [(cls.title, cls) for cls in schedules.SCHEDULES.values()]
    owners += [("classifier-free guidance", CFG), ("every method", Method)]
    return owners


def knob_table() -> dict[str, tuple[dataclasses.Field, str]]:
    """knob name -> (its field in the first class that defines it, its help), for every knob of
    every part; a name with two meanings (threshold) gets both in its help."""
    table: dict[str, tuple[dataclasses.Field, str]] = {}
    for who, cls in _owners():
        for f in cls.knobs():
            if f.name not in table:
                table[f.name] = (f, f.metadata["help"])
            elif f.metadata["help"] not in table[f.name][1]:
                first, help = table[f.name]
                table[f.name] = (first, f"{help}; with {who}: {f.metadata['help']}")
    return table


def compose(settings: dict[str, Any], given: set[str], method_name: str) -> Method:
    """A Method from flat knobs. `settings` holds the preset's values updated with the user's;
    `given` names the knobs the user set (only those are refused when no chosen part uses them).
    Raises a one-line DlmjaxError for anything that cannot work."""
    settings = dict(settings)
    rule_name = settings.pop("rule", "quota")
    if rule_name not in rules.RULES:
        raise DlmjaxError(f"unknown commit rule '{rule_name}'; use one of {', '.join(rules.RULES)}")
    schedule = settings.pop("schedule", None)
    if schedule is not None and schedule not in exits.EXITS:
        raise DlmjaxError(f"unknown schedule '{schedule}'; use one of {', '.join(exits.EXITS)}")
    cache_name = settings.pop("cache", None) or "none"
    if cache_name not in caches.CACHES:
        raise DlmjaxError(f"unknown cache '{cache_name}'; use one of {', '.join(caches.CACHES)}")
    blocks_name = settings.pop("blocks", None) or "semi_ar"
    if blocks_name not in schedules.SCHEDULES:
        raise DlmjaxError(f"unknown block schedule '{blocks_name}'; use one of {', '.join(schedules.SCHEDULES)}")
    attention = settings.pop("attention", None) or "bidirectional"
    if attention not in ATTENTIONS:
        raise DlmjaxError(f"unknown attention '{attention}'; use one of {', '.join(ATTENTIONS)}")

    used: set[str] = set()

    def take(cls: type[Part], fixed: dict | None = None) -> Part:
        kwargs = {f.name: settings[f.name] for f in cls.knobs() if settings.get(f.name) is not None}
        used.update(kwargs)
        return cls(**(fixed or {}), **kwargs)

    rule_cls = rules.RULES[rule_name]
    rule = take(rule_cls)
    if isinstance(rule, rules.Dream) and rule.top_k is not None:
        rule = dataclasses.replace(rule, top_k=int(rule.top_k))
    exit_rule = None
    if schedule is not None:
        cls, fixed = exits.EXITS[schedule]
        exit_rule = take(cls, fixed)
    guidance = take(CFG)
    guidance = guidance if guidance.cfg_scale else None
    blocks = take(schedules.SCHEDULES[blocks_name])
    method = take(Method, dict(rule=rule, blocks=blocks, exit=exit_rule, cache=caches.CACHES[cache_name](), guidance=guidance,
                               attention=attention))

    unused = [k for k in given if k not in used and k not in SELECTORS and k != "attention"]
    if unused:
        knob = unused[0]
        owners = [who for who, cls in _owners() if any(f.name == knob for f in cls.knobs())]
        chosen = f"rule '{rule_name}'" + (f", schedule '{schedule}'" if schedule else "") + (
            f", blocks '{blocks_name}'" if blocks_name != "semi_ar" else "")
        where = f"it belongs to {' and '.join(owners)}" if owners else "no method has it"
        raise DlmjaxError(f"{knob} does not apply to method '{method_name}' ({chosen}); {where}: drop it or choose that part")
    method.check()
    return method
