"""SPIN's work split across ranks: generation, reference log-probs, validation, the training batch.

Every function plans the work exactly as one process does (the same generation batches with the
same per-batch seeds, the same log-prob micro batches), deals whole batches round-robin to the
ranks and gathers the results, so what comes out does not depend on the world size. Under FSDP2
every forward is a collective: for scoring, a rank with fewer batches than its peers runs dummy
ones (results dropped), so no rank waits forever; generation runs on the all-gathered model.
With one process each function is the plain single-process computation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from spinlm.algorithms.scoring import plan_pair_batches, reference_pair_logprobs
from spinlm.model.decoding import supports_cached_decoding
from spinlm.model.generation import (
    Generations, SamplingParams, collect_generations, generate_planned, plan_batches,
)
from spinlm.model.loading import unwrap
from spinlm.model.parallel import gathered, needs_lockstep
from spinlm.utils.distributed import all_gather_objects, all_reduce_sum, info


def my_batches(n_batches: int, lockstep: bool) -> list[int | None]:
    """This rank's batch ids (round-robin: balanced when batches are sorted by length); with
    `lockstep`, padded with None (a dummy batch) to the count of the busiest rank."""
    d = info()
    mine: list[int | None] = list(range(d.rank, n_batches, d.world_size))
    if lockstep:
        mine += [None] * (math.ceil(n_batches / d.world_size) - len(mine))
    return mine


def generate_sharded(
    model: nn.Module, tokenizer, prompts: list[list[int]], params: SamplingParams, batch_size: int,
    generator_seed: int | None, show_progress: bool = False, answers: list[list[int]] | None = None,
) -> Generations:
    """`generation.generate` with the planned batches dealt to the ranks; every rank gets all answers.

    `answers` are scored in the decoding pass when cached decoding runs (answer_logps, else None).
    Under FSDP2 the model is all-gathered for the call (`parallel.gathered`): each rank then decodes
    its own batches with the same decoder as one process, and no forward is a collective.
    """
    plan = plan_batches(prompts, batch_size)
    cached = supports_cached_decoding(unwrap(model))
    with gathered(model):
        rows, answer_seconds = generate_planned(
            model, tokenizer, prompts, params, plan, my_batches(len(plan), lockstep=False), generator_seed,
            show_progress=show_progress and info().is_main, answers=answers if cached else None,
            cached_decoding=cached,
        )
    merged: dict = {}
    for part in all_gather_objects(rows):
        merged.update(part)
    return collect_generations(merged, len(prompts), answer_seconds)


def reference_logprobs_sharded(
    model: nn.Module, prompts: Sequence[Sequence[int]], actual: Sequence[Sequence[int]],
    generated: Sequence[Sequence[int]], pad_id: int, micro_batch_size: int, autocast=None,
) -> tuple[Tensor, Tensor]:
    """`scoring.reference_pair_logprobs` with its micro batches dealt to the ranks, summed back exactly
    (every value comes from one rank; the others add 0)."""
    n_batches = len(plan_pair_batches(prompts, actual, generated, micro_batch_size))
    act, gen = reference_pair_logprobs(
        model, prompts, actual, generated, pad_id, micro_batch_size, autocast,
        batch_ids=my_batches(n_batches, needs_lockstep(model)),
    )
    if not info().is_distributed:
        return act, gen
    total = torch.tensor(all_reduce_sum(act.tolist() + gen.tolist()), dtype=torch.float32)
    return total[: len(prompts)], total[len(prompts):]


def local_rows(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """This rank's contiguous share of a global training batch (the batch size divides evenly)."""
    d = info()
    if not d.is_distributed:
        return batch
    n = next(iter(batch.values())).shape[0] // d.world_size
    return {k: v[d.rank * n:(d.rank + 1) * n] for k, v in batch.items()}
