"""The trainer alone on a GPU (learner -> trainer): seconds and memory for one step.

A base model of a real size's shape (random weights: no model hub here, and the cost of
a step does not depend on what the weights are) gets LoRA steps on batches shaped like
agent traffic: ``--turns`` turns of ``--prompt`` prompt and ``--completion`` completion
tokens. Reports the seconds of a step, the tokens trained per second and the peak GPU
memory, one JSON line per step and a summary (the first step, which warms up, is left
out of it).

    python -m bench.trainer_bench --size 8b
    torchrun --nproc-per-node 2 -m bench.trainer_bench --size 8b --shard

Under torchrun every rank runs the step (`nextstate.learner.ranks`); rank 0 reports.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from nextstate.learner import ranks
from nextstate.learner.items import TrainItem
from nextstate.learner.trainer import Trainer, TrainerConfig

# Llama-shaped models of common sizes: (hidden, layers, heads, kv heads, MLP, vocabulary).
SIZES = {
    "tiny": (64, 2, 4, 2, 128, 512),  # to try the benchmark itself
    "0.5b": (896, 24, 14, 2, 4864, 151936),
    "3b": (3072, 28, 24, 8, 8192, 128256),
    "8b": (4096, 32, 32, 8, 14336, 128256),
}


def build(size: str, directory: Path) -> Path:
    """A random model of ``size``'s shape, saved where the trainer can load it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, layers, heads, kv, mlp, vocab = SIZES[size]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv,
                         intermediate_size=mlp, vocab_size=vocab,
                         max_position_embeddings=8192, tie_word_embeddings=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # random init on the GPU: seconds instead of minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    return directory


def batch(turns: int, prompt: int, completion: int, vocab: int, seed: int) -> list[TrainItem]:
    rng = random.Random(seed)
    return [TrainItem(turn_id=f"t{i}", prompt_ids=[rng.randrange(vocab) for _ in range(prompt)],
                      completion_ids=[rng.randrange(vocab) for _ in range(completion)],
                      sampler_logprobs=[-2.0] * completion, reward=rng.choice((-1.0, 1.0)),
                      teacher_logprobs=[-1.5] * completion if i % 2 else None)
            for i in range(turns)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--turns", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--completion", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--shard", action="store_true", help="FSDP across the ranks")
    parser.add_argument("--out", type=Path, default=None, help="write the summary here")
    args = parser.parse_args()

    rank = ranks.start() or 0
    world = torch.distributed.get_world_size() if ranks.several() else 1
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / args.size
        if rank == 0:
            build(args.size, model_dir)
        if world > 1:  # one directory for every rank: the ranks share this node's disk
            box = [str(model_dir)]
            torch.distributed.broadcast_object_list(box, src=0)
            model_dir = Path(box[0])
        trainer = Trainer(model_dir, replace(TrainerConfig(), shard=args.shard))
        vocab = SIZES[args.size][-1]
        rows = []
        for step in range(args.steps):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            start = time.monotonic()
            stats = trainer.step(batch(args.turns, args.prompt, args.completion, vocab, step))
            seconds = time.monotonic() - start
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0
            row = {"step": step, "seconds": round(seconds, 2),
                   "tokens_trained_per_s": round(stats.tokens_per_second),
                   "peak_gib": round(peak, 1), "kl": stats.kl}
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    if rank != 0:
        return
    timed = rows[1:] or rows
    summary = {
        "size": args.size, "ranks": world, "sharded": args.shard, "turns": args.turns,
        "prompt_tokens": args.prompt, "completion_tokens": args.completion,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "seconds_per_step": round(sum(r["seconds"] for r in timed) / len(timed), 2),
        "peak_gib": max(r["peak_gib"] for r in rows),
        "steps": rows,
    }
    print(json.dumps(summary))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
