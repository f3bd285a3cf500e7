"""Generation tokens/s of spinlm's backends side by side: spinlm's decoder, HF generate, the vLLM engine.

    python benchmarks/spin_bench.py --generation                        # SmolLM2-135M-Instruct, fp32
    python benchmarks/spin_bench.py --generation --vllm-python VENV/bin/python   # vLLM from another environment

Equal work for every backend: the same model weights, the same prompt token ids (the bundled task
rendered by spinlm), the same sampling (temperature 1.0, no top-k/top-p, the same stop tokens and
max new tokens), the same precision, one seed. Each backend runs in its own process, ``--repeats``
times, alternating; a backend's fastest round counts. Tokens/s = answer tokens (through the stop
token) / seconds in `generate`; tokens per CPU second (every thread of the process) is the steadier
figure on a shared machine. The engine's start and the weight push are reported apart.
vLLM pins transformers 5.19, so it usually lives in its own environment (`--vllm-python`).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch

BACKENDS = ("spinlm", "hf", "vllm")


def run_child(backend: str, spec: dict) -> dict:
    """One backend's generation of the whole workload, in this process."""
    from spinlm.data.dataset import build_dataset
    from spinlm.data.render import ChatRenderer
    from spinlm.model.generation import DecoderBackend, HFGenerateBackend, SamplingParams
    from spinlm.model.loading import load_pretrained

    w = spec["workload"]
    torch.set_num_threads(spec["threads"])
    model, tokenizer = load_pretrained(Path(spec["model"]))
    model.eval()
    renderer = ChatRenderer(tokenizer, None)
    ds = build_dataset(Path(spec["data"]), renderer, w["max_length"], w["max_length"] - w["new_tokens"],
                       limit=w["prompts"])
    prompts = [list(ds[i]["prompt_ids"]) for i in range(len(ds))]
    params = SamplingParams(temperature=spec["temperature"], max_length=w["new_tokens"], min_length=1,
                            end_strings=list(renderer.end_strings))
    out: dict = {"backend": backend, "startup_s": 0.0, "weight_sync_s": 0.0}
    if backend == "vllm":
        from spinlm.model.vllm_engine import EngineSettings, VLLMBackend

        settings = EngineSettings(dtype="float32", max_model_len=w["max_length"], gpu_memory_utilization=0.3,
                                  tensor_parallel_size=1, enforce_eager=True, max_num_seqs=max(w["gen_batch"], 1),
                                  kv_cache_bytes=spec.get("kv_cache_gb", 1) * 2**30, sleep=False, seed=spec["seed"])
        generator = VLLMBackend(tokenizer, model, settings)
        t0 = time.perf_counter()
        generator._engine()
        out["startup_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        generator.sync_weights(model.state_dict)
        out["weight_sync_s"] = time.perf_counter() - t0
    else:
        generator = (DecoderBackend if backend == "spinlm" else HFGenerateBackend)(tokenizer, w["gen_batch"])
    t0, c0 = time.perf_counter(), time.process_time()
    gens = generator.generate(model, prompts, params, seed=spec["seed"])
    out["generation_s"] = time.perf_counter() - t0
    out["cpu_s"] = time.process_time() - c0  # every thread of this process (the in-process engine's too)
    out["generated_tokens"] = sum(gens.lengths)
    out["truncated"] = gens.num_truncated
    out["tokens_per_s"] = out["generated_tokens"] / out["generation_s"]
    out["tokens_per_cpu_s"] = out["generated_tokens"] / out["cpu_s"]
    generator.close()
    import transformers

    out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    if backend == "vllm":
        import vllm

        out["versions"]["vllm"] = vllm.__version__
    return out


def quick_model(cache: Path) -> Path:
    """The tiny random chat model with head_dim 32 (vLLM's CPU attention has no kernel for the default's 8)."""
    from spinlm.model.tiny import build_tiny_model, build_tiny_tokenizer

    out = cache / "tiny-head32"
    if not (out / "config.json").is_file():
        tokenizer = build_tiny_tokenizer()
        build_tiny_model(tokenizer, hidden_size=64, num_heads=2, max_position_embeddings=512).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def vllm_importable(python: str) -> bool:
    return subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0


def compare(spec_path: Path, work: Path, script: str, env: dict, repeats: int, pythons: dict[str, str]) -> dict:
    """Every backend `repeats` times, alternating; {backend: fastest round}, plus every round."""
    rounds: dict[str, list[dict]] = {}
    for r in range(repeats):
        for backend, python in pythons.items():
            out = work / f"gen-{backend}-{r}.json"
            print(f"[spin_bench] generation round {r + 1}/{repeats}: {backend} ...", flush=True)
            subprocess.run([python, script, "--child", f"gen-{backend}", "--spec", str(spec_path),
                            "--child-out", str(out)], check=True, env=env)
            rounds.setdefault(backend, []).append(json.loads(out.read_text()))
            print(json.dumps(rounds[backend][-1]), flush=True)
    best = {b: max(rs, key=lambda x: x["tokens_per_s"]) for b, rs in rounds.items()}
    return {"best": best, "rounds": rounds}


def markdown(result: dict) -> str:
    best, base = result["best"], result["best"]["spinlm"]
    lines = ["| backend | generation tokens/s | / spinlm | tokens per CPU s | / spinlm | generation (s) | answer tokens | "
             "cut at max length | engine start (s) | weight push (s) | versions |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in best.items():
        versions = ", ".join(f"{k} {v}" for k, v in r["versions"].items())
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f} | "
                     f"{r['tokens_per_cpu_s']:.1f} | {r['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.2f} | "
                     f"{r['generation_s']:.1f} | {r['generated_tokens']} | {r['truncated']} | {r['startup_s']:.1f} | "
                     f"{r['weight_sync_s']:.2f} | {versions} |")
    per_round = "; ".join(f"{b}: " + ", ".join(f"{x['tokens_per_s']:.0f}" for x in rs)
                          for b, rs in result["rounds"].items())
    lines += ["", f"tokens/s of every round: {per_round}"]
    return "\n".join(lines)
