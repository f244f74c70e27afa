"""Training rows for supervised (prompt -> answer) data, and a deterministic batch stream.

A row is the prompt left-padded to `prompt_length`, then the answer and EOS up to
`gen_length` tokens, the layout LLaDA's SFT uses and `lm.generate` decodes into
(prompts are left-padded to a 32-token bucket there, and the canvas follows):

    [pad .. pad | prompt | answer | eos eos .. eos]
     <-- prompt_length --> <------ gen_length ---->

`loss_mask` marks what the objective scores: the whole generation region for masked
diffusion (the EOS padding counts as answer tokens, as in LLaDA's SFT, so the model learns
where an answer ends), and the answer with its first EOS for the autoregressive loss.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dlmjax.errors import DlmjaxError


def sft_arrays(
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    *,
    prompt_length: int,
    gen_length: int,
    pad_id: int,
    eos_id: int,
    objective: str,
) -> dict[str, np.ndarray]:
    """input_ids, attention_mask and loss_mask, int32 [N, prompt_length + gen_length]."""
    if len(prompts) != len(answers) or not prompts:
        raise DlmjaxError(f"need as many prompts as answers (and at least one): got {len(prompts)} and {len(answers)}")
    if objective not in ("mdm", "ar"):
        raise DlmjaxError(f"objective must be 'mdm' or 'ar', not {objective!r}")
    n, width = len(prompts), prompt_length + gen_length
    ids = np.full((n, width), eos_id, np.int32)
    attention = np.ones((n, width), np.int32)
    loss = np.zeros((n, width), np.int32)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        if not 0 < len(p) <= prompt_length:
            raise DlmjaxError(f"prompt {i} has {len(p)} tokens; prompt_length {prompt_length} must hold every prompt")
        if len(a) >= gen_length:
            raise DlmjaxError(f"answer {i} has {len(a)} tokens; gen_length {gen_length} must hold it and an EOS")
        start = prompt_length - len(p)
        ids[i, :start] = pad_id
        attention[i, :start] = 0
        ids[i, start:prompt_length] = p
        ids[i, prompt_length : prompt_length + len(a)] = a
        end = width if objective == "mdm" else prompt_length + len(a) + 1
        loss[i, prompt_length:end] = 1
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


class BatchStream:
    """Batch `step` of an endless sequence of shuffled epochs, a pure function of (seed, step).

    Resuming at step s therefore sees exactly the batches an uninterrupted run would, on any
    number of hosts: the global batch is fixed by (seed, step), and each process reads only the
    rows its devices hold (`batch(step, rows)`). The iterator's position is the step, which the
    checkpoint holds.
    """

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int = 0):
        sizes = {len(v) for v in arrays.values()}
        if len(sizes) != 1:
            raise DlmjaxError(f"training arrays differ in length: {sorted(sizes)}")
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        self.size = sizes.pop()
        if batch_size > self.size:
            raise DlmjaxError(f"batch_size {batch_size} exceeds the {self.size} training rows; lower it")
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return self._orders[epoch]

    def indices(self, step: int) -> np.ndarray:
        flat = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        return np.array([self._order(int(i) // self.size)[int(i) % self.size] for i in flat])

    def batch(self, step: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        """Batch `step`, or only its rows `rows` (a process reads just the rows its devices hold)."""
        idx = self.indices(step)[rows]
        return {k: v[idx] for k, v in self.arrays.items()}
