"""Benchmarks: ``python -m mtpeft.bench [overrides ...] [options]`` (``make bench``).

Two tables and an evaluation timing from one composed run config (``conf/train.yaml`` + Hydra
overrides, e.g. ``model=tiny_qwen2 data=mix3``), all built the way ``python -m mtpeft.train`` builds a run:

* the loop table (`mtpeft.bench.loop`): mtpeft's Lightning loop vs a bare PyTorch loop vs
  ``transformers.Trainer`` + peft on the same batches (targets: mtpeft <= 1.05 x bare, >= Trainer+peft);
* the evaluation line (`mtpeft.bench.evaluation`): seconds per 1000 prompts of one validation pass, the
  ``eval_s_per_1000_prompts`` of results.json;
* the per-method table (`mtpeft.bench.methods`): every method's training step relative to LoRA on a random
  and on real batches, eager and compiled, with activation memory and trainable parameters (targets: HyCAM
  <= 1.3x LoRA; MTL-LoRA, MultiLoRA, C-Poly <= 1.5x; MoE-LoRA E=8,k=2 <= 1.3x LoRA on real batches).
"""
