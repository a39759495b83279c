"""Train-step time of Poly and C-Poly relative to LoRA, on one tiny Llama and one batch, in one process.

    .venv/bin/python experiments/bench/poly_step_time.py [--repeats 15] [--warmup 3] [--threads 2]
                                                         [--device cpu|cuda]

Model: Llama, hidden 128, 4 layers, 4 heads, 2 KV heads, intermediate 344, vocab 1024 (random weights).
Batch: 32 x 96 tokens, 3 tasks (random task id per row). A step is forward + backward + AdamW update.
LoRA: r=8 on q,k,v,o (dropout 0.05, the default, and 0: Poly has no dropout); Poly and C-Poly: their defaults (r=8, K=4, q,k,v,o; C-Poly B=1 exclusive skill per
task, Gumbel-sigmoid weights), plus MHR variants with 4 heads. The methods are interleaved (warm-up
rounds, then rounds that time every method once in turn) and the median over rounds is reported, so
slow drifts of a shared machine hit every method alike. Target (issue 5): C-Poly at most 1.5x LoRA.
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
    "lora dropout=0": ("lora", {"r": 8, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "dropout": 0.0}),
    "poly": ("poly", {}),
    "poly H=4 (MHR)": ("poly", {"n_splits": 4}),
    "cpoly": ("cpoly", {}),
    "cpoly H=4": ("cpoly", {"n_splits": 4}),
}
NUM_TASKS = 3
BATCH, SEQ = 32, 96


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
    device = batch["input_ids"].device

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(**batch)
        loss = out.loss + sum(model.aux_losses().values(), torch.zeros((), device=device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1024, (BATCH, SEQ), generator=gen)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids,
        "task_ids": torch.randint(0, NUM_TASKS, (BATCH,), generator=gen),
    }
    batch = {key: value.to(device) for key, value in batch.items()}
    models, steps = {}, {}
    for label, (name, cfg) in METHODS.items():
        models[label] = build_method(name, cfg, base_model().to(device), num_tasks=NUM_TASKS).train()
        steps[label] = make_step(models[label], batch)

    times: dict[str, list[float]] = {label: [] for label in METHODS}
    for round_ in range(args.warmup + args.repeats):
        for label, step in steps.items():
            elapsed = step()
            if round_ >= args.warmup:
                times[label].append(elapsed)

    median = {label: statistics.median(t) for label, t in times.items()}
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
        f"batch {BATCH} x {SEQ}, median of {args.repeats}"
    )
    print("| method | step ms | x LoRA | trainable params |")
    print("|---|---:|---:|---:|")
    for label, model in models.items():
        params = model.count_parameters()[0]
        print(f"| {label} | {1000 * median[label]:.1f} | {median[label] / median['lora']:.2f} | {params:,} |")
    print(f"C-Poly / LoRA: {median['cpoly'] / median['lora']:.2f} (target <= 1.5)")
    print(f"C-Poly / LoRA without dropout (Poly has none): {median['cpoly'] / median['lora dropout=0']:.2f}")


if __name__ == "__main__":
    main()
