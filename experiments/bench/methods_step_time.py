"""Train-step time of the low-rank multi-task methods relative to LoRA, on one tiny Llama and one batch.

    .venv/bin/python experiments/bench/methods_step_time.py [--repeats 15] [--threads 1]

One process, the same base weights and batch for every method (32 x 96 tokens, 3 tasks). A step is
forward + backward + AdamW update (aux losses included). Methods are interleaved (warm-up rounds,
then rounds that time every method once in turn) and the median over rounds is reported, so slow
drifts of a shared machine hit every method alike. Both wall-clock and process CPU time are reported;
with the default single thread the CPU time is the steadier measure on a shared machine. Targets
(issue 5): MTL-LoRA and MultiLoRA at most 1.5x LoRA; MoE-LoRA with E=8, k=2 at most 1.3x MoE-LoRA with
E=2, k=2 (which, having k = E, runs the dense path; E=8, k=2 runs the sparse token dispatch).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mtpeft.methods import build_method

METHODS = {
    "lora": ("lora", {"r": 8, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
    "mtl_lora": ("mtl_lora", {}),
    "multilora": ("multilora", {}),
    "moe_lora E=2 k=2": ("moe_lora", {"num_experts": 2, "top_k": 2}),
    "moe_lora E=8 k=2": ("moe_lora", {"num_experts": 8, "top_k": 2}),
}
NUM_TASKS = 3


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=344,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


def make_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        out = model(**batch)
        loss = out.loss + sum(model.aux_losses().values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1024, (32, 96), generator=gen)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids,
        "task_ids": torch.randint(0, NUM_TASKS, (32,), generator=gen),
    }
    models, steps = {}, {}
    for label, (name, cfg) in METHODS.items():
        models[label] = build_method(name, cfg, base_model(), num_tasks=NUM_TASKS).train()
        steps[label] = make_step(models[label], batch)

    wall: dict[str, list[float]] = {label: [] for label in METHODS}
    cpu: dict[str, list[float]] = {label: [] for label in METHODS}
    for round_ in range(args.warmup + args.repeats):
        for label, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            if round_ >= args.warmup:
                wall[label].append(time.perf_counter() - start)
                cpu[label].append(time.process_time() - start_cpu)

    med = {label: statistics.median(t) for label, t in wall.items()}
    med_cpu = {label: statistics.median(t) for label, t in cpu.items()}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 32 x 96, median of {args.repeats}"
    )
    print("| method | step ms (wall) | x LoRA (wall) | step ms (CPU) | x LoRA (CPU) | trainable params |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, model in models.items():
        print(
            f"| {label} | {1000 * med[label]:.1f} | {med[label] / med['lora']:.2f} "
            f"| {1000 * med_cpu[label]:.1f} | {med_cpu[label] / med_cpu['lora']:.2f} "
            f"| {model.count_parameters()[0]:,} |"
        )
    e8, e2 = "moe_lora E=8 k=2", "moe_lora E=2 k=2"
    print(
        f"MoE-LoRA E=8,k=2 / E=2,k=2: {med[e8] / med[e2]:.2f} wall, {med_cpu[e8] / med_cpu[e2]:.2f} CPU "
        "(target <= 1.3)"
    )


if __name__ == "__main__":
    main()
