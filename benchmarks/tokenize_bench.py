"""Tokenizing throughput: 100k synthetic multi-turn conversations with the SmolLM2 tokenizer.

    python benchmarks/tokenize_bench.py                          # 100k conversations, ~10 min on 2 cores
    python benchmarks/tokenize_bench.py --conversations 5000     # quick look
    python benchmarks/tokenize_bench.py --out benchmarks/tokenize_results.json

Side by side in one process, each measured `--repeats` times in alternation (the fastest counts):

- per conversation: `ChatRenderer.render` one conversation at a time (what spinlm did before
  `spinlm.data.tokenize`), on the first `--baseline` conversations;
- cold, 1 process: `tokenize_conversations` batched, no cache;
- cold, N processes: the same with `--workers` worker processes;
- cached: the second read of a set whose ids the first call wrote to a fresh cache directory;
- reading: the set written as a parquet file (`messages` column) and read back into conversations
  by `sources.read_conversations`, as `spinlm train` reads it before tokenizing (first read: the
  `datasets` library converts it to Arrow; needs `spinlm[data]`, skipped without it).

It also checks that the batched ids equal `render`'s on a sample. TOKENIZERS_PARALLELISM=false
as under `spinlm train` (the CLI sets it), so one process encodes on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoTokenizer  # noqa: E402

from spinlm.data.chat import Conversation, Turn  # noqa: E402
from spinlm.data.render import ChatRenderer, conversation_to_messages  # noqa: E402
from spinlm.data.sources import DataSource, read_conversations  # noqa: E402
from spinlm.data.tokenize import tokenize_conversations  # noqa: E402
from spinlm.model.prepare import cached_model_path  # noqa: E402

WORDS = ("the of and to in is you that it for was on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more write "
         "go see number no way could people my than first water been call who oil its now find long down day did "
         "get come made may part answer question because example function value model data step 12 7 19 2024 "
         "café naïve déjà").split()


def synthetic_conversations(n: int, seed: int = 0) -> list[Conversation]:
    """Chat-like conversations: 1-4 exchanges, 30% with a system prompt, questions of 5-40 words,
    answers of 2-8 sentences (about 300 tokens a conversation with SmolLM2's tokenizer)."""
    rng = random.Random(seed)

    def sentence() -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(5, 18))).capitalize() + rng.choice(".?!")

    out = []
    for _ in range(n):
        turns: list[Turn] = []
        for _ in range(rng.choice((1, 1, 2, 2, 3, 4))):
            turns.append(Turn("user", " ".join(sentence() for _ in range(rng.randint(1, 3)))))
            turns.append(Turn("assistant", " ".join(sentence() for _ in range(rng.randint(2, 8)))))
        system = "You are a helpful assistant. Answer briefly." if rng.random() < 0.3 else None
        out.append(Conversation(tuple(turns), system=system))
    return out


def timed(fn):
    """(wall seconds, CPU seconds of this process and of its finished worker processes, result).
    On a busy machine the CPU seconds are the steadier figure: N idle cores take about CPU / N."""
    t0, c0 = time.perf_counter(), _cpu_seconds()
    out = fn()
    return time.perf_counter() - t0, _cpu_seconds() - c0, out


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def read_parquet_seconds(convs: list[Conversation]) -> tuple[float, float] | None:
    """(wall, CPU) seconds to read `convs` back from a parquet file of `messages` rows, or None
    without the datasets library. Its cache goes to a temporary directory, removed after."""
    try:
        import datasets
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        datasets.config.HF_DATASETS_CACHE = str(Path(tmp) / "cache")
        path = str(Path(tmp) / "train.parquet")
        datasets.Dataset.from_list([{"messages": conversation_to_messages(c)} for c in convs]).to_parquet(path)
        seconds, cpu_seconds, read = timed(lambda: read_conversations(DataSource(path)))
    if [c.turns for c in read] != [c.turns for c in convs]:
        raise SystemExit("the parquet file did not read back to the same conversations")
    return seconds, cpu_seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(cached_model_path()), help="tokenizer directory (default: SmolLM2)")
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--baseline", type=int, default=5_000, help="conversations rendered one at a time")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="worker processes (all cores)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--check", type=int, default=1_000, help="conversations checked against render")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    renderer = ChatRenderer(tokenizer)
    convs = synthetic_conversations(args.conversations)
    print(f"{len(convs)} conversations, {sum(len(c.turns) for c in convs)} turns; tokenizer {args.model}", flush=True)

    best: dict[str, float] = {}
    cpu: dict[str, float] = {}  # CPU seconds per conversation, the least of the repeats
    tokens = 0
    for repeat in range(args.repeats):
        runs = {
            "per conversation (render)": lambda: [renderer.render(c) for c in convs[:args.baseline]],
            "cold, 1 process": lambda: tokenize_conversations(convs, renderer, workers=1, show_progress=False),
            f"cold, {args.workers} processes": lambda: tokenize_conversations(
                convs, renderer, workers=args.workers, show_progress=False),
        }
        for name, fn in runs.items():
            seconds, cpu_seconds, result = timed(fn)
            count = args.baseline if name.startswith("per") else len(convs)
            best[name] = max(best.get(name, 0.0), count / seconds)
            cpu[name] = min(cpu.get(name, float("inf")), cpu_seconds / count)
            if name == "cold, 1 process":
                tokens = int(result.offsets["prompt"][-1] + result.offsets["answer"][-1])
            print(f"repeat {repeat}: {name}: {seconds:.1f}s ({cpu_seconds:.1f} CPU s), "
                  f"{count / seconds:,.0f} conversations/s", flush=True)

    with tempfile.TemporaryDirectory() as cache:
        write_s, _, written = timed(lambda: tokenize_conversations(convs, renderer, workers=args.workers,
                                                                   cache_dir=cache, show_progress=False))
        read_s, read_cpu, cached = timed(lambda: tokenize_conversations(convs, renderer, cache_dir=cache,
                                                                        show_progress=False))
        cache_bytes = sum(f.stat().st_size for f in Path(cache).iterdir())
    best["cached (second read)"] = len(convs) / read_s
    cpu["cached (second read)"] = read_cpu / len(convs)
    print(f"cache: written with the cold run in {write_s:.1f}s; read back in {read_s:.2f}s "
          f"({cache_bytes / 2**20:.0f} MiB)", flush=True)

    reading = read_parquet_seconds(convs)
    if reading is not None:
        print(f"read from parquet into conversations: {reading[0]:.1f}s ({reading[1]:.1f} CPU s)", flush=True)

    sample = convs[:args.check]
    same = all(cached.get("prompt", i).tolist() == p and cached.get("answer", i).tolist() == a
               for i, (p, a) in enumerate(renderer.render(c) for c in sample))
    print(f"ids equal to ChatRenderer.render on the first {len(sample)}: {same}", flush=True)

    base = best["per conversation (render)"]
    results = {
        "conversations": len(convs), "tokens": tokens, "tokens_per_conversation": tokens / len(convs),
        "conversations_per_s": best, "speedup_vs_per_conversation": {k: v / base for k, v in best.items()},
        "seconds_for_all": {k: len(convs) / v for k, v in best.items()},
        "cpu_seconds_for_all": {k: v * len(convs) for k, v in cpu.items()},
        "read_parquet_seconds": None if reading is None else {"wall": reading[0], "cpu": reading[1]},
        "cache_mib": cache_bytes / 2**20, "ids_equal_render": same, "workers": args.workers,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
                    "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]]},
    }
    print(f"load average (1 min) before / after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
    print("\n| how | conversations/s | wall s for all | CPU s for all | vs per conversation |\n|---|---|---|---|---|")
    for name, rate in best.items():
        print(f"| {name} | {rate:,.0f} | {len(convs) / rate:,.1f} | {cpu[name] * len(convs):,.1f} | {rate / base:.1f}x |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
