"""Block schedules: which part of the canvas a step may commit, and for how many steps.

`SemiAR` is LLaDA's semi-autoregressive loop: the generation region is cut into blocks decoded
left to right, `steps` forward passes spread evenly over them; one block of `gen_length` is the
single-canvas decode. Each schedule is a part (`dlmjax.decode.parts`) whose fields are static:
they fix the program's shapes and loop bounds.
"""

from __future__ import annotations

from typing import ClassVar

from dlmjax.decode.parts import Part, part, static
from dlmjax.errors import DlmjaxError


@part
class SemiAR(Part):
    name: ClassVar[str] = "semi_ar"
    gen_length: int = static(128, "tokens to generate (default: max_new_tokens of the model's generation_config.json, else 128)")
    block_length: int = static(128, "tokens per block, decoded left to right (default: the method's)")
    steps: int = static(128, "forward passes of the quota schedule, spread evenly over the blocks (default: gen-length)")

    def check(self) -> None:
        gen, block, steps = self.gen_length, self.block_length, self.steps
        if gen <= 0 or block <= 0 or steps <= 0:
            raise DlmjaxError(f"gen_length, block_length and steps must be positive, got {gen}, {block}, {steps}")
        if gen % block:
            raise DlmjaxError(f"gen_length {gen} is not divisible by block_length {block}; pick a block_length that divides it")
        if steps % self.num_blocks:
            raise DlmjaxError(
                f"steps {steps} is not divisible by the {self.num_blocks} blocks; use a multiple of {self.num_blocks}"
            )

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks
