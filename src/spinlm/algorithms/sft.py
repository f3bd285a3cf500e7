"""`spinlm sft`: plain supervised fine-tuning on SPIN's loop: the ground-truth answers, no opponent.

It makes the "SFT model" SPIN starts from, and it is the baseline a SPIN result is compared with.
Everything but the step is `SPINTrainer`'s: the config (`trainer.spin.*` drive the loop), the data
readers and order, checkpoints and exact resume, logging, validation (`val/loss`), the held-out
evaluation, `max_time`, signals and the export. What differs:

- no reference policy and no generation: a step trains on the next global batch of the same
  schedule SPIN's pairs follow (`spinlm.algorithms.pairs`: the same prompts in the same order,
  with `model.spin.mix_iterations` the earlier iterations' prompts too), with their ground truth;
- the loss is the token-mean negative log-likelihood over the global batch of the final assistant
  turn, or of every assistant turn (`model.sft.loss_turns=all`); `val/loss` is always the final turn's;
- an "iteration" is a block of steps that ends with the held-out evaluation, as in SPIN, so SFT
  and SPIN compare at equal steps (`trainer.spin.max_iterations` blocks);
- `model.sft.early_stopping_patience=N`: stop once `val/loss` has not improved for N validations in
  a row; each improving validation saves a checkpoint, and `final/` exports the best one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from spinlm.algorithms.sharded import local_rows
from spinlm.algorithms.spin import SPINTrainer
from spinlm.data.collate import spin_custom_collate
from spinlm.model import parallel
from spinlm.model.logprobs import answer_logprob_sums
from spinlm.utils.distributed import all_reduce_sum, any_rank, barrier, broadcast_from_main, info
from spinlm.utils.guards import non_finite


class SFTTrainer(SPINTrainer):
    """SPINTrainer with the SFT step (see the module docstring); `reference` is None."""

    def __init__(self, cfg, policy, reference, *args, **kwargs):
        super().__init__(cfg, policy, reference, *args, **kwargs)
        self.patience = cfg.model.sft.early_stopping_patience
        self.best_val_loss: float | None = None
        self.stale_validations = 0  # validations since val/loss last improved

    # ----- data: the prompts of SPIN's schedule with their ground-truth answers ----------------
    def augment_dataloader(self, iteration: int, epoch: int) -> Iterator[dict[str, Tensor]]:
        keys = self.pair_sets.keys(iteration, epoch)
        for batch_keys in self._remaining_batches(keys):
            yield self._sft_batch([i for _, i in batch_keys])

    def _sft_batch(self, indices: list[int]) -> dict[str, Tensor]:
        items = [self.train_dataset[i] for i in indices]
        b = spin_custom_collate([{**it, "index": i} for it, i in zip(items, indices)], self.eos_id)
        loss_mask = b["masks"].clone()
        for row, it in enumerate(items):  # model.sft.loss_turns=all: the earlier answers too
            if "prompt_mask" in it:
                loss_mask[row, :len(it["prompt_mask"])] |= torch.tensor(it["prompt_mask"], dtype=torch.bool)
        return {"tokens": b["prompts_and_answers"], "loss_mask": loss_mask, "sample_index": b["sample_index"]}

    def _step_sizes(self, batch: dict[str, Tensor]) -> dict[str, int]:
        return {"micro batch": self.micro_batch_size, "global batch": batch["tokens"].shape[0],
                "seq len": batch["tokens"].shape[1]}

    # ----- one optimizer step ---------------------------------------------------------------------
    def train_single_step(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """Token-mean NLL of the global batch's answer tokens, accumulated over micro batches; clip, step."""
        t0 = time.perf_counter()
        self.policy.train()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = int(batch["loss_mask"].sum())  # of the whole global batch: every rank divides by it
        scale = info().world_size / tokens  # DDP/FSDP2 average the ranks' gradients
        batch = local_rows(batch)
        n, nll_sum = batch["tokens"].shape[0], 0.0
        for s in range(0, n, self.micro_batch_size):
            rows = slice(s, s + self.micro_batch_size)
            with self._autocast(), parallel.grad_sync(self.policy, enabled=s + self.micro_batch_size >= n):
                nll = -answer_logprob_sums(self.policy, batch["tokens"][rows].to(self.device),
                                           batch["loss_mask"][rows].to(self.device)).sum()
            loss = nll * scale
            if any_rank(not torch.isfinite(loss)):
                non_finite(self.step + 1, f"the loss is {loss.item()}", self.skip_non_finite)
                return self._skip_step(t0)
            self.scaler.scale(loss).backward()  # fp16: scaled (a no-op otherwise)
            nll_sum += nll.item()
        update = self._clip_and_step()
        if isinstance(update, str):
            return self._skip_step(t0, update)
        return {"loss": all_reduce_sum([nll_sum])[0] / tokens, "tokens": tokens, "grad_norm": update[0],
                "lr": update[1], "step_time": time.perf_counter() - t0, "epoch": self.epoch,
                "iteration": self.iteration}

    def _log_samples(self, batch: dict[str, Tensor], k: int = 3) -> None:
        """Nothing is generated in SFT."""

    # ----- early stopping -------------------------------------------------------------------------
    def run_validation(self) -> dict[str, float]:
        metrics = super().run_validation()
        if self.patience is None or self.last_val_loss is None:
            return metrics
        if self.best_val_loss is None or self.last_val_loss < self.best_val_loss:
            self.best_val_loss, self.stale_validations = self.last_val_loss, 0
            self.save()  # the best so far: kept by the checkpointer (best by val_loss), exported at the end
        else:
            self.stale_validations += 1
        return metrics

    def _done(self) -> bool:
        return super()._done() or (self.patience is not None and self.stale_validations >= self.patience)

    def save(self) -> None:
        if self._saved_step != self.step:  # an improving validation may have saved this step already
            super().save()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sft_best_val_loss": self.best_val_loss,
                "sft_stale_validations": self.stale_validations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.best_val_loss = state.get("sft_best_val_loss")
        self.stale_validations = int(state.get("sft_stale_validations", 0))

    def _finish(self) -> None:
        """With early stopping, `final/` is the best checkpoint by val/loss, not the last step."""
        if self.patience is not None:
            best = broadcast_from_main(self.checkpointer.best() if info().is_main else None)
            if best is not None:
                parallel.load_full_state_dict(self.policy, self.checkpointer.weights(best, "policy"))
            barrier()
        super()._finish()
