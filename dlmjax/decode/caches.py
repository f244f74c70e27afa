"""KV-cache policies: what a decode step feeds the model and which cache slots it rewrites.

Each policy is a part (`dlmjax.decode.parts`) with no knobs; its class is the structure. The
exact rules are in SPEC.md (Fast-dLLM KV caches; the exact block cache). Users pick one by
name (`cache="dual"`).
"""

from __future__ import annotations

from typing import ClassVar

from dlmjax.decode.parts import Part, part


class Cache(Part):
    stores: ClassVar[bool] = True  # the decode carries a KV cache
    exact: ClassVar[bool] = False  # cached steps give exactly the uncached logits (block-causal attention)


@part
class NoCache(Cache):
    """Every step is a full forward of the canvas."""

    name: ClassVar[str] = "none"
    stores: ClassVar[bool] = False


@part
class Prefix(Cache):
    """Fast-dLLM's prefix cache: a block's first step refreshes every slot; later steps recompute
    the generation region and keep the slots before the block (approximate)."""

    name: ClassVar[str] = "prefix"


@part
class Dual(Cache):
    """Fast-dLLM's DualCache: a block's first step refreshes every slot; later steps recompute only
    the block (approximate)."""

    name: ClassVar[str] = "dual"


@part
class Block(Cache):
    """The exact block cache: under block-causal attention a finished block's K/V are final and are
    written once."""

    name: ClassVar[str] = "block"
    exact: ClassVar[bool] = True


CACHES: dict[str, type[Cache]] = {cls.name: cls for cls in (NoCache, Prefix, Dual, Block)}
