"""``python -m mtpeft.bench [overrides ...] [options]``: the loop and per-method tables (see `mtpeft.bench`)."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
from pathlib import Path

import torch

from mtpeft.bench.config import RunParts, compose_run
from mtpeft.bench.evaluation import eval_markdown, eval_timing
from mtpeft.bench.loop import describe, loop_config_overrides, loop_markdown, run_loops
from mtpeft.bench.loss_memory import loss_memory, loss_memory_markdown
from mtpeft.bench.methods import (
    method_variants,
    methods_markdown,
    random_batch,
    reference_method,
    run_methods,
)
from mtpeft.utils.memory import set_malloc_mmap_threshold
from mtpeft.utils.threads import apply_cpu_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mtpeft.bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides of conf/train.yaml (model=..., data=...)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: the run's cpu_threads)"
    )
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    loop = parser.add_argument_group("loop table")
    loop.add_argument("--no-loop", action="store_true", help="skip the loop table")
    loop.add_argument(
        "--loop-method",
        default=None,
        help="method of the loop table (unless overridden; default: the reference method of the per-method table)",
    )
    loop.add_argument("--steps", type=int, default=40, help="training steps per loop and round")
    loop.add_argument("--skip", type=int, default=5, help="warm-up steps not timed")
    loop.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--no-eval", action="store_true", help="skip the evaluation timing")
    evaluation.add_argument(
        "--eval-batches", type=int, default=None, help="eval batches to time (default: the whole val split)"
    )
    memory = parser.add_argument_group("LM-loss memory")
    memory.add_argument(
        "--no-loss-memory", action="store_true", help="skip the full-logits vs chunked loss memory table"
    )
    methods = parser.add_argument_group("per-method table (and the LM-loss memory's random batch)")
    methods.add_argument("--no-methods", action="store_true", help="skip the per-method table")
    methods.add_argument(
        "--only",
        nargs="*",
        help=f"variants to run (the reference always first): {', '.join(method_variants())}",
    )
    methods.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    methods.add_argument("--warmup", type=int, default=2, help="untimed rounds first (compilation included)")
    methods.add_argument("--batch", type=int, default=32, help="rows of the random batch")
    methods.add_argument("--length", type=int, default=96, help="tokens per row of the random batch")
    methods.add_argument("--real-batches", type=int, default=4, help="real training batches per round")
    methods.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="also time the compiled step"
    )
    methods.add_argument(
        "--sequential",
        action="store_true",
        help="one variant in memory at a time (for real models: interleaving holds a base copy per variant)",
    )
    args = parser.parse_intermixed_args(argv)
    unknown = sorted(set(args.only or ()) - set(method_variants()))
    if unknown:
        parser.error(f"unknown --only variant(s) {unknown}; valid: {', '.join(method_variants())}")
    return args


def main(argv: list[str] | None = None) -> str:
    """Run the requested tables; print (and write to ``--out``) the markdown report, and return it."""
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    command = "python -m mtpeft.bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    lines = [f"`{command}`", ""]
    with tempfile.TemporaryDirectory(prefix="mtpeft-bench-") as tmp:
        user = list(args.overrides)
        has_method = any(o.lstrip("+~").startswith("method=") for o in user)
        loop_overrides = user if has_method else [f"method={args.loop_method or reference_method()}", *user]
        cfg = compose_run([*loop_overrides, *loop_config_overrides(args.steps)], tmp)
        if args.threads:
            torch.set_num_threads(args.threads)
        else:
            apply_cpu_threads(cfg.get("cpu_threads", "auto"), cfg.model)
        set_malloc_mmap_threshold(cfg.get("cpu_malloc_mmap_threshold_kb"))
        parts = RunParts.build(cfg)
        lines += [f"torch {torch.__version__}, {describe(cfg)}", ""]
        if not args.no_loop:
            rows = run_loops(parts, args.steps, args.rounds, args.skip)
            lines += [*loop_markdown(rows, args.steps, args.skip), ""]
        if not args.no_eval:
            timing = eval_timing(parts, args.eval_batches)
            lines += [*eval_markdown(timing, cfg.method.name), ""]
        if not args.no_loss_memory:
            lines += [*_loss_memory_section(parts, args.batch, args.length), ""]
        if not args.no_methods:
            variants = method_variants()
            chosen = {
                k: v for i, (k, v) in enumerate(variants.items()) if i == 0 or not args.only or k in args.only
            }
            base = [o for o in user if not o.lstrip("+~").startswith("method")]
            rows, device = run_methods(
                parts,
                chosen,
                lambda overrides: compose_run([*base, *overrides], tmp),
                batch=args.batch,
                length=args.length,
                real_batches=args.real_batches,
                repeats=args.repeats,
                warmup=args.warmup,
                compiled=args.compile,
                sequential=args.sequential,
            )
            order = "sequential (one variant at a time)" if args.sequential else "interleaved"
            real_shape = "x".join(str(s) for s in parts.train_batches(1)[0]["input_ids"].shape)
            lines += [
                f"Per-method training step ({device.type}): random batch {args.batch} x {args.length}; "
                f"real batches: the first {args.real_batches} of the run's datamodule "
                f"(first {real_shape}); median of {args.repeats} {order} rounds after {args.warmup} warm-up.",
                "",
                *methods_markdown(rows, device, args.compile),
            ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return report


def _loss_memory_section(parts: RunParts, batch: int, length: int) -> list[str]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab = parts.base_model.get_input_embeddings().weight.shape[0]
    rows = loss_memory(parts, random_batch(batch, length, vocab, parts.num_tasks, device))
    return loss_memory_markdown(rows, parts.cfg.method.name, f"{batch} x {length}", device.type == "cuda")


if __name__ == "__main__":
    main()
