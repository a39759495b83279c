"""Train-step benchmark of every method relative to LoRA: ``python -m mtpeft.bench`` (``make bench``).

One process, one base model, one batch (default: the tiny Llama shape, 32 x 96 tokens, 3 tasks). A step
is forward + backward (aux losses included) + AdamW update. Variants are interleaved: warm-up rounds,
then rounds that time every variant once in turn, and the median per variant is reported, so slow
drifts of a shared machine hit every variant alike. Reported side by side: wall and CPU step time and
their ratio to LoRA, activation memory saved for backward (bytes of the tensors autograd keeps, the
part of peak training memory that depends on the method; on CUDA the allocator's peak instead), and
trainable parameters. Targets from the issues: HyCAM <= 1.3x LoRA; MTL-LoRA, MultiLoRA, C-Poly <= 1.5x
LoRA; MoE-LoRA E=8,k=2 <= 1.3x MoE-LoRA E=2,k=2. Timings are never asserted in tests.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mtpeft.methods import AdaptedModel, build_method

LORA = ("lora", {"r": 8, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]})
VARIANTS: dict[str, tuple[str, dict]] = {
    "lora r=8 qkvo": LORA,
    "hycam": ("hycam", {}),
    "hycam dispatch=dense": ("hycam", {"dispatch": "dense"}),
    "mtl_lora": ("mtl_lora", {}),
    "multilora": ("multilora", {}),
    "poly": ("poly", {}),
    "cpoly": ("cpoly", {}),
    "moe_lora E=2 k=2": ("moe_lora", {"num_experts": 2, "top_k": 2}),
    "moe_lora E=8 k=2": ("moe_lora", {"num_experts": 8, "top_k": 2}),
    "peml": ("peml", {}),
}
NUM_TASKS = 3


def base_model(seed: int = 0) -> LlamaForCausalLM:
    """The tiny Llama shape of ``conf/model/tiny_llama.yaml`` with random weights."""
    torch.manual_seed(seed)
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


def make_batch(batch: int, length: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1024, (batch, length), generator=gen)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": ids.to(device),
        "task_ids": torch.randint(0, NUM_TASKS, (batch,), generator=gen).to(device),
    }


def make_step(model: AdaptedModel, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        out = model(**batch)
        loss = out.loss + sum(model.aux_losses().values(), torch.zeros((), device=out.loss.device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def saved_activation_mb(model: AdaptedModel, batch: dict[str, torch.Tensor]) -> float:
    """MB of tensors autograd saves for backward in one forward (storage counted once)."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    del out
    return sum(seen.values()) / 2**20


def run(variants: dict[str, tuple[str, dict]], batch_size: int, length: int, repeats: int, warmup: int):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = make_batch(batch_size, length, device)
    models = {
        label: build_method(name, options, base_model(), num_tasks=NUM_TASKS).to(device).train()
        for label, (name, options) in variants.items()
    }
    steps = {label: make_step(model, batch) for label, model in models.items()}
    memory = {}
    for label, model in models.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            steps[label]()
            memory[label] = torch.cuda.max_memory_allocated() / 2**20
        else:
            memory[label] = saved_activation_mb(model, batch)
    wall: dict[str, list[float]] = {label: [] for label in models}
    cpu: dict[str, list[float]] = {label: [] for label in models}
    for round_ in range(warmup + repeats):
        for label, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ >= warmup:
                wall[label].append(time.perf_counter() - start)
                cpu[label].append(time.process_time() - start_cpu)
    rows = []
    for label, model in models.items():
        rows.append(
            {
                "variant": label,
                "wall_ms": 1000 * statistics.median(wall[label]),
                "cpu_ms": 1000 * statistics.median(cpu[label]),
                "memory_mb": memory[label],
                "trainable": model.count_parameters()[0],
            }
        )
    return rows, device


def to_markdown(rows: list[dict], device: torch.device, args: argparse.Namespace) -> str:
    ref = rows[0]
    memory_label = "peak CUDA MB" if device.type == "cuda" else "saved activations MB"
    lines = [
        f"torch {torch.__version__}, device {device.type}, {torch.get_num_threads()} threads, "
        f"batch {args.batch} x {args.length}, median of {args.repeats} interleaved rounds "
        f"(`python -m mtpeft.bench --threads {args.threads} --repeats {args.repeats}`)",
        "",
        f"| variant | step ms (wall) | x LoRA (wall) | step ms (CPU) | x LoRA (CPU) | {memory_label} | x LoRA | trainable |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['wall_ms']:.1f} | {row['wall_ms'] / ref['wall_ms']:.2f} "
            f"| {row['cpu_ms']:.1f} | {row['cpu_ms'] / ref['cpu_ms']:.2f} | {row['memory_mb']:.1f} "
            f"| {row['memory_mb'] / ref['memory_mb']:.2f} | {row['trainable']:,} |"
        )
    by = {row["variant"]: row for row in rows}
    if "moe_lora E=8 k=2" in by and "moe_lora E=2 k=2" in by:
        ratio = by["moe_lora E=8 k=2"]["wall_ms"] / by["moe_lora E=2 k=2"]["wall_ms"]
        lines += ["", f"MoE-LoRA E=8,k=2 / E=2,k=2 step time: {ratio:.2f} (wall)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--only", nargs="*", help="variant labels to run (LoRA is always first)")
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only or v is LORA}
    rows, device = run(variants, args.batch, args.length, args.repeats, args.warmup)
    table = to_markdown(rows, device, args)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()
