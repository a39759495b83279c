"""HyCAM vs LoRA: train-step time and peak memory on the same tiny Llama and batch, in one process.

    .venv/bin/python experiments/bench/hycam_vs_lora.py [--rounds 15] [--device cpu|cuda] [--hycam k=v ...]

Model: Llama, hidden 128, 4 layers, 4 heads, 2 KV heads, intermediate 344, vocab 1024 (random weights).
Batch: 32 x 96 tokens. A step is forward + backward (LM loss + the method's aux losses) + AdamW step.
LoRA: r=8 on q,k,v,o (the other options are `conf/method/lora.yaml`'s defaults); HyCAM: its defaults.
The methods alternate step by step after a warm-up, so both see the same machine load; the report gives
the median step time of each and their ratio, plus the median of the per-round ratios (each round's two
steps run back to back, so this one is robust to a shared machine's load drifting); target: <= 1.3.

Peak memory: on CUDA, the allocator's peak during one step; on CPU, the peak of live tensor bytes during
one step from the torch profiler's memory timeline (the tensors the step touches: parameters, gradients,
optimiser state, inputs, activations and temporaries).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers
import yaml
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action

from mtpeft.methods import build_method

SHAPE = dict(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)
BATCH, SEQ = 32, 96
LORA = {"r": 8, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def build(name: str, options: dict, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).to(device)
    model = build_method(name, options, base, num_tasks=3).train()
    optimizer = torch.optim.AdamW(model.parameter_groups(0.0), lr=1e-3)
    return model, optimizer


def step(model, optimizer, batch: dict[str, torch.Tensor]) -> None:
    out = model(**batch)
    loss = out.loss + sum(model.aux_losses().values(), torch.zeros((), device=out.loss.device))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(model, optimizer, batch, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(model, optimizer, batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory_mb(model, optimizer, batch, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(model, optimizer, batch)
        return torch.cuda.max_memory_allocated() / 2**20
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step(model, optimizer, batch)
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action in (Action.PREEXISTING, Action.CREATE):
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak / 2**20


def parse_options(pairs: list[str]) -> dict:
    """``["rank=4", "apply_to=attn_output"]`` -> ``{"rank": 4, "apply_to": "attn_output"}`` (YAML values)."""
    return {key: yaml.safe_load(value) for key, _, value in (pair.partition("=") for pair in pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per method (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default). 1 by default: on a shared 2-core machine, multi-threaded "
        "step times are dominated by contention with other processes",
    )
    parser.add_argument("--hycam", nargs="*", default=[], metavar="KEY=VALUE", help="HyCAM config overrides")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    methods = {"lora": LORA, "hycam": parse_options(args.hycam)}
    built = {name: build(name, options, device) for name, options in methods.items()}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SHAPE["vocab_size"], (BATCH, SEQ), generator=gen).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    for _ in range(args.warmup):
        for model, optimizer in built.values():
            step(model, optimizer, batch)
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(args.rounds):
        for name, (model, optimizer) in built.items():
            times[name].append(timed(model, optimizer, batch, device))

    print(f"device={device} threads={torch.get_num_threads()} batch={BATCH}x{SEQ} rounds={args.rounds}")
    print(f"hycam options: {methods['hycam'] or 'defaults'}")
    print(f"{'method':<8}{'trainable':>11}{'median ms':>11}{'min ms':>9}{'tokens/s':>10}{'peak MiB':>10}")
    median = {}
    for name, (model, optimizer) in built.items():
        median[name] = statistics.median(times[name])
        peak = peak_memory_mb(model, optimizer, batch, device)
        print(
            f"{name:<8}{model.count_parameters()[0]:>11,}{median[name] * 1e3:>11.1f}"
            f"{min(times[name]) * 1e3:>9.1f}{BATCH * SEQ / median[name]:>10.0f}{peak:>10.1f}"
        )
    ratios = {
        "of medians": median["hycam"] / median["lora"],
        "median per round": statistics.median(
            h / lo for h, lo in zip(times["hycam"], times["lora"], strict=True)
        ),
        "of minima": min(times["hycam"]) / min(times["lora"]),
    }
    print(
        "step-time ratio hycam/lora (target <= 1.3): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
    )


if __name__ == "__main__":
    main()
