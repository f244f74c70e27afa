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


def recipe_arrays(
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    *,
    length: int,
    pad_id: int,
    end_id: int | None = None,
    labels: bool = False,
    pack: bool = False,
    pack_group: int = 1000,
) -> dict[str, np.ndarray]:
    """Rows of the seed recipes (training-recipes.md 1.2, 2.2, 3.2), int32 [N, length]:

    * dParallel and D2F: the prompt at the start, then the answer and `end_id` (EOS; D2F's LLaDA
      data ends answers with <|eot_id|>), right-padded with `pad_id` (the official data pads with
      EOS, which is masked and trained like the answer); "input_ids" and "prompt_lengths" [N].
      A row longer than `length` is an error (the official code drops or truncates it).
    * Fast-dLLM v2 (`labels=True`): "input_ids" and "labels", the answer and its end token as
      labels and -100 elsewhere; with `pack=True` the examples of each group of `pack_group` are
      concatenated and cut into rows of `length` (the group's remainder dropped), documents not
      separated, as the official fine-tuning packs; else one example per row, padded (labels -100).
    """
    if len(prompts) != len(answers) or not prompts:
        raise DlmjaxError(f"need as many prompts as answers (and at least one): got {len(prompts)} and {len(answers)}")
    if pack and not labels:
        raise DlmjaxError("pack=True packs Fast-dLLM v2 rows; pass labels=True too")
    seqs, labs, prompt_lengths = [], [], []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        tail = list(a) + ([end_id] if end_id is not None else [])
        seqs.append(list(p) + tail)
        labs.append([-100] * len(p) + tail)
        prompt_lengths.append(len(p))
        if not pack and len(seqs[-1]) > length:
            raise DlmjaxError(f"example {i} has {len(seqs[-1])} tokens, more than the row length {length}; raise length or drop it")
    if pack:
        rows, row_labels = [], []
        for start in range(0, len(seqs), pack_group):
            ids = [t for s in seqs[start:start + pack_group] for t in s]
            lab = [t for s in labs[start:start + pack_group] for t in s]
            for cut in range(0, len(ids) - length + 1, length):
                rows.append(ids[cut:cut + length])
                row_labels.append(lab[cut:cut + length])
        if not rows:
            raise DlmjaxError(f"the examples hold fewer than {length} tokens per group of {pack_group}: nothing to pack")
        return {"input_ids": np.asarray(rows, np.int32), "labels": np.asarray(row_labels, np.int32)}
    n = len(seqs)
    ids = np.full((n, length), pad_id, np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    if labels:
        lab = np.full((n, length), -100, np.int32)
        for i, s in enumerate(labs):
            lab[i, :len(s)] = s
        return {"input_ids": ids, "labels": lab}
    return {"input_ids": ids, "prompt_lengths": np.asarray(prompt_lengths, np.int32)}


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
