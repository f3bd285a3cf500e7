"""SPIN's work split across ranks: reference log-probs, validation, the training batch (generation:
the backends of `spinlm.model.generation`).

Every function plans the work exactly as one process does (the same log-prob micro batches), deals
whole batches round-robin to the ranks and gathers the results, so what comes out does not depend on
the world size. Under FSDP2 every forward is a collective: a rank with fewer batches than its peers
runs dummy ones (results dropped), so no rank waits forever. With one process each function is the
plain single-process computation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from spinlm.algorithms.scoring import reference_pair_logprobs
from spinlm.data.collate import spin_custom_collate
from spinlm.model.logprobs import masked_sum_logprobs
from spinlm.model.parallel import needs_lockstep
from spinlm.utils import rng
from spinlm.utils.distributed import all_gather_objects, all_reduce_sum, info, my_share


def reference_logprobs_sharded(
    model: nn.Module, prompts: Sequence[Sequence[int]], actual: Sequence[Sequence[int]],
    generated: Sequence[Sequence[int]], pad_id: int, micro_batch_size: int, autocast=None,
) -> tuple[Tensor, Tensor]:
    """`scoring.reference_pair_logprobs` with its micro batches dealt to the ranks, summed back exactly
    (every value comes from one rank; the others add 0)."""
    n_batches = math.ceil(len(prompts) / micro_batch_size)  # the number of plan_pair_batches' micro batches
    act, gen = reference_pair_logprobs(
        model, prompts, actual, generated, pad_id, micro_batch_size, autocast,
        batch_ids=my_share(n_batches, needs_lockstep(model)),
    )
    if not info().is_distributed:
        return act, gen
    total = torch.tensor(all_reduce_sum(act.tolist() + gen.tolist()), dtype=torch.float32)
    return total[: len(prompts)], total[len(prompts):]


@torch.no_grad()
def answer_nll_sharded(
    model: nn.Module, dataset, batches: list[list[int]], micro_batch_size: int, pad_id: int, autocast,
) -> tuple[float, float]:
    """(summed NLL, token count) of the ground-truth answers of `batches` (dataset indices), over all
    ranks; micro batches dealt to the ranks (FSDP2: padded with dummy forwards)."""
    chunks = [b[s:s + micro_batch_size] for b in batches for s in range(0, len(b), micro_batch_size)]
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for c in my_share(len(chunks), needs_lockstep(model)):
        b = spin_custom_collate([dataset[i] for i in chunks[c if c is not None else 0]], pad_id)
        with autocast():
            logps = masked_sum_logprobs(model, b["prompts_and_answers"].to(device), b["masks"].to(device))
        if c is not None:
            nll -= logps.float().sum().item()
            tokens += int(b["masks"].sum())
    nll, tokens = all_reduce_sum([nll, tokens])
    return nll, tokens


def local_rows(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """This rank's contiguous share of a global training batch (the batch size divides evenly)."""
    d = info()
    if not d.is_distributed:
        return batch
    n = next(iter(batch.values())).shape[0] // d.world_size
    return {k: v[d.rank * n:(d.rank + 1) * n] for k, v in batch.items()}


def rank_rng_states() -> list[dict]:
    """Every rank's RNG states (torch, CUDA, numpy, Python; dropout streams differ per rank), gathered
    for the checkpoint."""
    return all_gather_objects(rng.capture())


def set_rank_rng_state(states: list[dict]) -> None:
    """This rank's saved RNG state; under another world size every rank continues rank 0's."""
    d = info()
    rng.restore(states[d.rank] if len(states) == d.world_size else states[0])
