"""SPINTrainer: the Self-Play Fine-Tuning loop (Chen et al. 2024), readable top to bottom.

Each iteration t the reference policy (the iterate of t-1) answers the training prompts; the
policy is trained with a DPO-style loss to prefer the ground-truth ("actual") answer over the
reference's ("generated") one; at the end of the iteration the reference becomes the policy.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm.auto import tqdm

from spinlm.algorithms.pairs import PairKey, PairSets
from spinlm.algorithms.rollouts import Rollout, RolloutStore, opponent_answers_from_data
from spinlm.algorithms.scoring import batch_pairs, pair_logprobs
from spinlm.algorithms.sharded import (
    answer_nll_sharded, local_rows, rank_rng_states, reference_logprobs_sharded, set_rank_rng_state,
)
from spinlm.config import kl_penalty_for_iteration, resolve_interval
from spinlm.data.collate import spin_custom_collate
from spinlm.data.dataset import validation_batches
from spinlm.errors import TrainingError  # noqa: F401 (re-exported)
from spinlm.loss import reward_metrics, spin_loss
from spinlm.model import lora, parallel
from spinlm.model.generation import GenerationBackend, SamplingParams
from spinlm.model.kernels import linear_kernel_in_use
from spinlm.model.loading import export_hf
from spinlm.model.precision import precision_of
from spinlm.model.reference import ReferencePolicy
from spinlm.schedule import step_schedule
from spinlm.utils.checkpoint import Checkpointer, check_same_layout
from spinlm.utils.distributed import all_gather_objects, any_rank, barrier, broadcast_from_main, gather_rows, info
from spinlm.utils.guards import apply_gradients, non_finite, oom_guard
from spinlm.utils.logger import RunLogger, RunTimer
from spinlm.utils.signals import StopRequested, StopSignals

log = logging.getLogger(__name__)


_STEP_KEYS = ("model.micro_batch_size", "model.data.train_ds.max_seq_length", "model.spin.length_params.max_length")
_GENERATION_KEYS = ("model.spin.rollout_micro_batch_size", "model.spin.log_prob_forward_micro_batch_size",
                    "model.spin.length_params.max_length")


class SPINTrainer:
    """Coordinates SPIN: generation, reference log-probs, the loss step, validation, checkpoints.

    Supports:
      - generation once per iteration (default; the reference is fixed within it), kept on disk
        in `rollouts/` and reused by every epoch and by a resumed run; or every epoch
        (`model.spin.regenerate_each_epoch`, NeMo's behaviour);
      - reference log-probs computed once per generated set, in fixed batches;
      - the paper's data mixing (the last k iterations' pairs) and an opponent mixture of earlier
        iterates' answers (`spinlm.algorithms.pairs`);
      - any micro batch size, gradient accumulation up to `model.global_batch_size`;
      - sigmoid / hinge / ipo losses, beta scalar or one per iteration;
      - exact resume: weights, optimizer, scheduler, RNG, data position (the data order is a
        function of seed, iteration and epoch) and the generated answers;
      - validation on the same batches every time (SFT loss of the ground-truth answers);
      - a wall-time limit (`trainer.max_time`): validate, save, stop;
      - SIGTERM/SIGINT: finish the step (or abandon a generation in progress), save, return;
      - a NaN/inf loss or gradient stops the run before the optimizer step (or skips the step,
        `trainer.spin.skip_non_finite_steps`); an out-of-memory error names the sizes and keys.
      - one process, or torchrun ranks with DDP or FSDP2 (`spinlm.algorithms.sharded` splits the
        work; results match one process); rank 0 alone writes files and logs;
      - no reference copy: the policy while they are equal, or with LoRA (`model.peft`) the policy with
        its adapters off, merged at iteration ends (`model/reference.py`).
    Assumes: chat data rendered by `spinlm.data`, right-padded batches.
    """

    def __init__(
        self,
        cfg: DictConfig,
        policy: nn.Module,
        reference: ReferencePolicy,
        tokenizer: Any,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        train_dataset: Any,
        val_dataset: Any,
        logger: RunLogger,
        checkpointer: Checkpointer,
        rollout_store: RolloutStore,
        run_timer: RunTimer,
        generator: GenerationBackend,
        end_strings: list[str] | None = None,
        evaluator: Callable[..., dict[str, float]] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ):
        self.cfg = cfg.trainer.spin
        self.model_cfg = cfg.model
        self.policy, self.reference, self.tokenizer = policy, reference, tokenizer
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.logger, self.checkpointer, self.rollouts, self.run_timer = logger, checkpointer, rollout_store, run_timer
        self.evaluator = evaluator  # held-out evaluation (spinlm.evaluation.HeldOutEvaluator) or None
        # fp16 (16-mixed) scales the loss so small gradients do not underflow; a no-op otherwise
        self.scaler = grad_scaler or torch.amp.GradScaler(enabled=False)
        self.generator = generator  # samples the reference's answers (model.spin.generation_backend)
        self.device = next(policy.parameters()).device
        self.eos_id = tokenizer.eos_token_id
        self.precision = str(cfg.trainer.precision)
        self.save_hf_on_end = cfg.exp_manager.checkpoint_callback_params.save_nemo_on_train_end

        spin = self.model_cfg.spin
        sampling = OmegaConf.to_container(spin.sampling_params, resolve=True)
        sampling["end_strings"] = list(dict.fromkeys(sampling["end_strings"] + list(end_strings or [])))
        self.sampling = SamplingParams(**sampling, **OmegaConf.to_container(spin.length_params, resolve=True))

        self.global_batch_size = self.model_cfg.global_batch_size
        self.micro_batch_size = self.model_cfg.micro_batch_size
        self.schedule = step_schedule(len(train_dataset), self.cfg, self.global_batch_size,
                                      self.model_cfg.spin.mix_iterations)
        self.steps_per_epoch, self.max_steps = self.schedule.steps_per_epoch, self.schedule.max_steps
        self.pair_sets = PairSets(cfg, rollout_store, len(train_dataset), self.steps_per_epoch * self.global_batch_size,
                                  self._reference_logprobs)
        self.val_check_interval = resolve_interval(
            self.cfg.val_check_interval, self.steps_per_epoch, "trainer.spin.val_check_interval"
        )
        self.val_batches = validation_batches(len(val_dataset), self.global_batch_size,
                                              self.model_cfg.data.validation_ds.drop_last, self.cfg.limit_val_batches)

        self.step = 0
        self.consumed_samples = 0
        self.beta = kl_penalty_for_iteration(spin.ref_policy_kl_penalty, 0)
        self.last_val_loss: float | None = None
        self.last_eval: dict[str, float] = {}  # held-out metrics measured at this step (checkpoint ranking)
        self._pending_timings: dict[str, float] = {}
        self.stop_signals = StopSignals()
        self.skip_non_finite = bool(self.cfg.skip_non_finite_steps)
        self._saved_step: int | None = None

    # ----- derived position -------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.schedule.position(self.step)[1]

    @property
    def iteration(self) -> int:
        return self.schedule.position(self.step)[0]

    # ----- the loop ---------------------------------------------------------------------
    def fit(self) -> None:
        """Iterations x epochs x batches; at each iteration end the reference becomes the policy.

        A stop (SIGTERM/SIGINT, or max_time, which also validates) ends the step in progress, saves
        and returns without the final export; the same command then resumes."""
        self.run_timer.start()
        bar = tqdm(total=self.max_steps, initial=self.step, desc="Training steps", dynamic_ncols=True,
                   disable=not info().is_main)
        stop = None  # why the run stops early: a signal's name or "max_time"
        with self.stop_signals:
            # ranks would abandon a generation at different moments, inside collectives: not with torchrun
            self.stop_signals.set_deadline(None if info().is_distributed else self.run_timer.max_seconds)
            try:
                if self.step == 0:
                    self.evaluate_held_out()  # the start model
                while not self._done() and stop is None:
                    iteration, epoch = self.iteration, self.epoch
                    self.beta = kl_penalty_for_iteration(self.model_cfg.spin.ref_policy_kl_penalty, iteration)
                    for batch in self.augment_dataloader(iteration, epoch):
                        self.stop_signals.abandon_on_deadline = True  # a step is trained: stopping progresses
                        with oom_guard("the train step", self._step_sizes(batch), _STEP_KEYS):
                            metrics = self.train_single_step(batch)
                        self.step += 1
                        self.consumed_samples += self.global_batch_size
                        if self.schedule.is_iteration_end(self.step) and self.reference is not None:
                            # before any save at this boundary, so a resume trains against the new opponent
                            self.reference.refresh_from(self.policy, self.optimizer)
                        self._log_step(metrics, batch)
                        if self.schedule.is_iteration_end(self.step):
                            self.evaluate_held_out()
                        bar.update(1)
                        bar.set_postfix(iteration=iteration, epoch=epoch, loss=f"{metrics['loss']:.4f}")

                        is_last = self._done()
                        stop = None if is_last else self._stop_reason()
                        if self.step % self.val_check_interval == 0 or is_last or stop == "max_time":
                            with oom_guard("validation", {"micro batch": self.micro_batch_size}, _STEP_KEYS):
                                self.run_validation()
                            self._log_samples(batch)
                            is_last = self._done()  # SFT stops once val/loss stalls
                        if self.step % self.cfg.save_interval == 0 or is_last or stop:
                            self.save()
                        if is_last or stop:
                            break
            except StopRequested as signalled:  # during generation: that work is abandoned
                stop = signalled.name
                if self.step > 0 and self._saved_step != self.step:
                    self.save()
        bar.close()
        if stop:
            log.warning("%s at step %d: saved; run the same command again to resume", stop, self.step)
        else:
            self._finish()

    def _done(self) -> bool:
        return self.step >= self.max_steps

    def _stop_reason(self) -> str | None:
        """Why to stop now; the ranks agree (the first rank's reason that has one)."""
        reason = self.stop_signals.received or ("max_time" if self.run_timer.is_finished() else None)
        return next((r for r in all_gather_objects(reason) if r), None)

    def _step_sizes(self, batch: dict[str, Tensor]) -> dict[str, int]:
        return {"micro batch": self.micro_batch_size, "global batch": batch["actual"].shape[0],
                "seq len": max(batch["actual"].shape[1], batch["generated"].shape[1])}

    # ----- data: pair each ground-truth answer with the reference's answer --------------
    def augment_dataloader(self, iteration: int, epoch: int) -> Iterator[dict[str, Tensor]]:
        """Training batches of the epoch from the current step on, with generations and reference log-probs."""
        sizes = {"rollout batch": self.model_cfg.spin.rollout_micro_batch_size,
                 "log-prob batch": self.model_cfg.spin.log_prob_forward_micro_batch_size,
                 "max prompt len": max(len(s["prompt_ids"]) for s in self.train_dataset.samples),
                 "max new tokens": self.sampling.max_length}
        with self.stop_signals.abandonable(), oom_guard("generation / reference log-probs", sizes, _GENERATION_KEYS):
            keys, answers = self.pair_sets.for_epoch(iteration, epoch, self._rollouts_for(iteration, epoch))
        self._pending_timings.update(self.pair_sets.pop_metrics())
        for batch_keys in self._remaining_batches(keys):
            yield self._pair_batch(batch_keys, answers)

    def _remaining_batches(self, keys: list[PairKey]) -> Iterator[list[PairKey]]:
        """The epoch's global batches of keys from the current step's position on (a resume starts mid-epoch)."""
        gbs = self.global_batch_size
        for b in range(self.schedule.position(self.step)[2], len(keys) // gbs):
            yield keys[b * gbs:(b + 1) * gbs]

    def _rollouts_for(self, iteration: int, epoch: int) -> dict[int, Rollout]:
        per_epoch = bool(self.model_cfg.spin.regenerate_each_epoch)
        key_epoch = epoch if per_epoch else None
        epochs = range(epoch, epoch + 1) if per_epoch else range(self.cfg.max_epochs)
        indices = self.pair_sets.own_prompts(iteration, epochs)
        cached = broadcast_from_main(self.rollouts.load(iteration, key_epoch, indices) if info().is_main else None)
        if cached is not None:
            return cached
        self._require_reference(f"making {self.rollouts.path(iteration, key_epoch)} (missing or unreadable)")
        items = [self.train_dataset[i] for i in indices]
        prompts = [list(it["prompt_ids"]) for it in items]

        t_sync = time.perf_counter()
        self.generator.sync_weights(self.reference.state_dict)  # an engine with its own copy: pushed in place
        t0 = time.perf_counter()
        gens = opponent_answers_from_data(self.train_dataset, indices, iteration, self.model_cfg.spin)
        with self._autocast(), self.reference.active() as reference:  # spinlm's decoder also scores both answers
            gens = gens or self.generator.generate(
                reference, prompts, self.sampling, show_progress=True,
                seed=self.model_cfg.seed + 104729 * (iteration + 1) + (epoch if per_epoch else 0),
                answers=[list(it["answer_ids"]) for it in items],
            )
        t1 = time.perf_counter()
        if gens.answer_logps is not None:
            ref_act, ref_gen = torch.tensor(gens.answer_logps), torch.tensor(gens.logps)
            t1 -= gens.answer_seconds  # report the answer scoring as reference time
        else:
            ref_act, ref_gen = self._reference_logprobs(indices, gens.ids)
        t2 = time.perf_counter()

        rollouts = {
            i: Rollout(ids, trunc, float(a), float(g))
            for i, ids, trunc, a, g in zip(indices, gens.ids, gens.truncated, ref_act.tolist(), ref_gen.tolist())
        }
        if info().is_main:
            texts = {i: self.tokenizer.decode(ids) for i, ids in zip(indices, gens.ids)}
            self.rollouts.save(iteration, key_epoch, rollouts, texts)
        n_tokens = sum(gens.lengths)
        self._pending_timings = {
            **self._pending_timings,
            "timing/weight_sync_s": t0 - t_sync,
            "timing/generation_s": t1 - t0,
            "timing/generation_tokens_per_s": n_tokens / max(t1 - t0, 1e-9),
            "timing/ref_logprobs_s": t2 - t1,
            "train/generations_truncated": gens.num_truncated, "train/generations_count": len(indices),
        }
        log.info(
            "iteration %d: generated %d answers (%d tokens, %d cut at max_length) in %.1fs; reference log-probs %.1fs",
            iteration, len(indices), n_tokens, gens.num_truncated, t1 - t0, t2 - t1,
        )
        return rollouts

    def _reference_logprobs(self, indices: list[int], generated: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Reference log p(actual) and log p(generated) for a set, in length-sorted micro batches of pairs."""
        self._require_reference("scoring answers under the reference")
        items = [self.train_dataset[i] for i in indices]
        with self.reference.active() as reference:
            return reference_logprobs_sharded(
                reference, [it["prompt_ids"] for it in items], [it["answer_ids"] for it in items],
                generated, self.eos_id, self.model_cfg.spin.log_prob_forward_micro_batch_size, self._autocast)

    def _require_reference(self, why: str) -> None:
        at_start = self.step == 0 or self.schedule.is_iteration_end(self.step)
        self.reference.require(at_start, f"{why} at step {self.step}, inside iteration {self.iteration},")

    def _pair_batch(self, keys: list[PairKey], answers: dict[PairKey, Rollout]) -> dict[str, Tensor]:
        indices = [i for _, i in keys]
        rollouts = [answers[k] for k in keys]
        items = [self.train_dataset[i] for i in indices]
        actual = spin_custom_collate([{**it, "index": i} for it, i in zip(items, indices)], self.eos_id)
        generated = spin_custom_collate(
            [{"prompt_ids": it["prompt_ids"], "answer_ids": r.generated_ids} for it, r in zip(items, rollouts)],
            self.eos_id,
        )
        return {
            "actual": actual["prompts_and_answers"],
            "actual_mask": actual["masks"],
            "generated": generated["prompts_and_answers"],
            "generated_mask": generated["masks"],
            "prompts_only": actual["prompts_only"],
            "prompt_lengths": actual["prompt_lengths"],
            "generated_lengths": generated["combined_lengths"] - generated["prompt_lengths"],
            "generated_truncated": torch.tensor([r.truncated for r in rollouts]),
            "ref_policy_log_probs_actual": torch.tensor([r.ref_logp_actual for r in rollouts]),
            "ref_policy_log_probs_generated": torch.tensor([r.ref_logp_generated for r in rollouts]),
            "sample_index": actual["sample_index"],
        }

    # ----- one optimizer step -----------------------------------------------------------
    def train_single_step(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """Zero grads, accumulate the loss over micro batches (one forward on actual + generated), clip, step."""
        t0 = time.perf_counter()
        self.policy.train()
        self.optimizer.zero_grad(set_to_none=True)
        batch = local_rows(batch)  # this rank's rows; DDP/FSDP2 average the gradients over ranks
        n = batch["actual"].shape[0]
        losses, rew_act, rew_gen, pol_act, pol_gen = [], [], [], [], []
        for s in range(0, n, self.micro_batch_size):
            rows = slice(s, s + self.micro_batch_size)
            # DDP all-reduces in the backward of the last micro batch only (its forward decides)
            with self._autocast(), parallel.grad_sync(self.policy, enabled=s + self.micro_batch_size >= n):
                logps_act, logps_gen = pair_logprobs(self.policy, *batch_pairs(batch, rows), self.eos_id)
            out = spin_loss(
                logps_act, logps_gen,
                batch["ref_policy_log_probs_actual"][rows].to(self.device),
                batch["ref_policy_log_probs_generated"][rows].to(self.device),
                self.beta, self.model_cfg.spin.loss_type,
            )
            loss = out.losses.sum() / n
            if any_rank(not torch.isfinite(loss)):
                non_finite(self.step + 1, f"the loss is {loss.item()}", self.skip_non_finite)
                return self._skip_step(t0)
            self.scaler.scale(loss).backward()
            losses.append(out.losses.detach())
            rew_act.append(out.rewards_actual)
            rew_gen.append(out.rewards_generated)
            pol_act.append(logps_act.detach())
            pol_gen.append(logps_gen.detach())
        update = self._clip_and_step()
        if isinstance(update, str):
            return self._skip_step(t0, update)
        # the whole global batch, from every rank: one gather of the five per-row columns
        columns = torch.stack([torch.cat(t).float() for t in (losses, rew_act, rew_gen, pol_act, pol_gen)], dim=1)
        losses, rew_act, rew_gen, pol_act, pol_gen = gather_rows(columns).cpu().unbind(dim=1)
        metrics = {
            "loss": losses.mean().item(),
            **reward_metrics(rew_act, rew_gen),
            "logps_actual_mean": pol_act.mean().item(),  # policy sum log p, as TRL's logps/chosen
            "logps_generated_mean": pol_gen.mean().item(),
            "grad_norm": update[0],
            "lr": update[1],
            "beta": self.beta,
        }
        if self.scaler.is_enabled():
            metrics["loss_scale"] = self.scaler.get_scale()
        metrics["step_time"] = time.perf_counter() - t0
        metrics["epoch"], metrics["iteration"] = self.epoch, self.iteration  # of the step being trained
        return metrics

    def _clip_and_step(self) -> tuple[float, float] | str:
        return apply_gradients(self.policy, self.optimizer, self.scheduler, self.scaler, self.cfg.gradient_clip_val,
                               self.step + 1, self.skip_non_finite)

    def _skip_step(self, t0: float, why: str = "skipped_non_finite") -> dict[str, float]:
        """A step without update (non-finite under skip_non_finite_steps, or an fp16 overflow); the lr
        schedule still advances."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return {"loss": float("nan"), why: 1, "beta": self.beta, "step_time": time.perf_counter() - t0,
                "epoch": self.epoch, "iteration": self.iteration}

    # ----- validation ---------------------------------------------------------------------
    @torch.no_grad()
    def run_validation(self) -> dict[str, float]:
        """Token-mean SFT loss (NLL) of the ground-truth answers of the validation batches."""
        if not self.val_batches:
            return {}
        was_training = self.policy.training
        self.policy.eval()
        total_nll, total_tokens = answer_nll_sharded(
            self.policy, self.val_dataset, self.val_batches, self.micro_batch_size, self.eos_id, self._autocast)
        self.policy.train(was_training)
        self.last_val_loss = total_nll / max(total_tokens, 1)
        metrics = {"val/loss": self.last_val_loss}
        self.logger.log_metrics(metrics, self.step)
        return metrics

    def evaluate_held_out(self) -> None:
        """Held-out accuracy and SFT loss of the policy after the iterations done so far, logged as eval/*."""
        if self.evaluator is not None:  # the reference == the policy here, in the compute dtype: no cast per step
            with contextlib.nullcontext(self.policy) if self.reference is None else self.reference.active() as model:
                metrics = self.evaluator(model, self.schedule.position(self.step)[0], self._autocast)
            self.last_eval = {k.replace("/", "_"): v for k, v in metrics.items() if k.startswith("eval/")}
            self.last_eval["eval_step"] = self.step
            self.logger.log_metrics(metrics, self.step)

    # ----- logging ------------------------------------------------------------------------
    def _log_step(self, metrics: dict[str, float], batch: dict[str, Tensor]) -> None:
        row = {f"train/{k}": v for k, v in metrics.items() if k != "step_time"}
        if "generated_lengths" in batch:
            row["train/avg_generated_lengths"] = batch["generated_lengths"].float().mean().item()
        row.update({
            "train/consumed_samples": self.consumed_samples,
            "train/step_time": metrics["step_time"],
            "timing/train_step_s": metrics["step_time"],
        })
        row.update(self._pending_timings)
        self._pending_timings = {}
        self.logger.log_metrics(row, self.step)

    def _log_samples(self, batch: dict[str, Tensor], k: int = 3) -> None:
        rows = []
        for i in range(min(k, batch["actual"].shape[0])):
            p = int(batch["prompt_lengths"][i])
            g = int(batch["generated_lengths"][i])
            rows.append({
                "prompt": self.tokenizer.decode(batch["prompts_only"][i, :p]),
                "response": self.tokenizer.decode(batch["generated"][i, p:p + g]),
            })
        self.logger.log_table("train/generations", rows, self.step)

    # ----- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "epoch": self.epoch,
            "iteration": self.iteration,
            "val_loss": self.last_val_loss,
            # eval_accuracy, eval_sft_loss, ... of this step's policy: what checkpoint_callback_params.monitor ranks
            **(self.last_eval if self.last_eval.get("eval_step") == self.step else {}),
            "layout": self._layout(),
            "cpu_linear_kernel": linear_kernel_in_use(self.policy),  # reused on resume: same rounding
        }

    def _layout(self) -> dict[str, Any]:
        """What fixes the data position of a step: a resume under other values would silently differ."""
        return {"model.global_batch_size": self.global_batch_size, "model.seed": self.model_cfg.seed,
                "training samples": len(self.train_dataset), "steps per epoch": self.steps_per_epoch,
                "trainer.spin.max_epochs": self.cfg.max_epochs,
                "model.data.train_ds.shuffle": bool(self.model_cfg.data.train_ds.shuffle),
                **{f"model.spin.{k}": self.model_cfg.spin[k] for k in ("mix_iterations", "opponent_mix_prob",
                                                                      "opponent_history")},
                **lora.layout(self.model_cfg)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_same_layout(state.get("layout"), self._layout())
        self.step = int(state["step"])
        self.consumed_samples = int(state["consumed_samples"])
        self.last_val_loss = state.get("val_loss")
        self.last_eval = {k: v for k, v in state.items() if k.startswith("eval_")}

    def save(self) -> None:
        """Full (unsharded) weights and name-keyed optimizer state, gathered from all ranks; rank 0 writes."""
        self._saved_step = self.step
        modules = {"policy": parallel.full_state_dict(self.policy)}
        if self.reference is not None:
            modules.update(self.reference.checkpoint_weights())
        optimizer = parallel.full_optimizer_state_dict(self.policy, self.optimizer)
        rng = rank_rng_states()
        if info().is_main:
            states = {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "rng": rng,
                      "grad_scaler": self.scaler.state_dict()}
            if self.reference is not None:  # spinlm sft has none
                states["reference"] = self.reference.checkpoint_state()
            self.checkpointer.save(self.step, modules=modules, states=states, meta=self.state_dict())
        barrier()

    def restore(self, path, loaded: tuple[dict, dict] | None = None) -> None:
        """Resume from a checkpoint directory written by `save` (`loaded`: its (states, meta), already read)."""
        states, meta = loaded or self.checkpointer.load(path, {})
        read = self.checkpointer.weights if info().is_main else (lambda path, name: {})  # the others receive shares
        parallel.load_full_state_dict(self.policy, read(path, "policy"))
        if self.reference is not None:
            self.reference.restore(lambda name: read(path, name), states.get("reference", {}))
        parallel.load_full_optimizer_state_dict(self.policy, self.optimizer, states.get("optimizer", {}))
        self.scheduler.load_state_dict(states["scheduler"])
        if states.get("grad_scaler"):
            self.scaler.load_state_dict(states["grad_scaler"])
        set_rank_rng_state(states["rng"])
        self.load_state_dict(meta)
        self.logger.rewind(self.step)
        log.info("resumed from %s at step %d (iteration %d, epoch %d)", path, self.step, self.iteration, self.epoch)

    def _finish(self) -> None:
        if self.save_hf_on_end:
            state = lora.hf_state_dict(self.policy)  # unsharded, adapters merged, gathered on rank 0
            if info().is_main:
                out = export_hf(self.policy, self.tokenizer, self.logger.run_dir / "final", state_dict=state)
                log.info("final policy exported to %s (Hugging Face format)", out)
            barrier()

    def _autocast(self):
        return precision_of(self.precision).autocast(self.device.type)

