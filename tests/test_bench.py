"""``python -m mtpeft.bench``: the loop table (mtpeft / bare / Trainer+peft) and the per-method table run on a
shrunk composed config, and the bare loop trains exactly like mtpeft's Lightning loop. No timing assertions."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from mtpeft.bench.__main__ import main
from mtpeft.bench.config import RunParts, compose_run
from mtpeft.bench.loop import bare_loop, lightning_loop, loop_config_overrides
from mtpeft.bench.methods import method_variants, reference_method
from mtpeft.methods import available_methods, build_method, get_method
from tests.conftest import TINY_RUN

#: The shrunk test config, minus the step budget (the bench sets its own).
TINY = [o for o in TINY_RUN if not o.startswith("trainer.max_steps")]


@pytest.mark.slow
def test_cli_prints_and_writes_both_tables(tmp_path):
    out = tmp_path / "results.md"
    options = ["--steps", "4", "--skip", "1", "--rounds", "1", "--repeats", "1", "--warmup", "0"]
    options += ["--real-batches", "2", "--batch", "4", "--length", "16", "--no-compile", "--threads", "1"]
    report = main([*TINY, *options, "--only", "moe_lora E=8 k=2", "--out", str(out)])
    assert out.read_text() == report
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    for loop in ("mtpeft (Lightning)", "bare PyTorch", "transformers.Trainer + peft"):
        assert loop in rows
    assert "lora" in rows and "moe_lora E=8 k=2" in rows and "hycam" not in rows
    bare_cells = rows["bare PyTorch"].split("|")
    assert float(bare_cells[3]) == 1.0 and float(bare_cells[2]) > 0  # x bare of the bare loop itself
    assert report.startswith("`python -m mtpeft.bench ")


def test_bare_loop_trains_like_the_lightning_loop(tmp_path):
    """Same batches, loss, clipping, AdamW and schedule: the adapters end up equal (dropout off)."""
    cfg = compose_run([*TINY, "method=mtl_lora", "method.dropout=0.0", *loop_config_overrides(3)], tmp_path)
    parts = RunParts.build(cfg)
    trained = {}

    def keep(name, fresh_method):
        def fresh(*args, **kwargs):
            model = fresh_method(*args, **kwargs)
            trained[name] = model
            return model

        return fresh

    for name, loop in (("lightning", lightning_loop), ("bare", bare_loop)):
        parts.fresh_method = keep(name, RunParts.fresh_method.__get__(parts))
        clock = loop(parts, 3, tmp_path / name)
        assert len(clock.ends) == 3 and math.isfinite(clock.ms_per_step(0))
    lightning, bare = (trained[n].adapter_state_dict() for n in ("lightning", "bare"))
    L.seed_everything(cfg.seed, verbose=False)  # as the loops do before building the method
    initial = RunParts.fresh_method(parts).adapter_state_dict()
    assert any(not torch.equal(lightning[k], initial[k]) for k in initial)  # it trained
    for key in initial:
        torch.testing.assert_close(bare[key], lightning[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("order", ["interleaved", "sequential"])
def test_cli_methods_table_only(tmp_path, order):
    options = ["--no-loop", "--only", "hycam", "--repeats", "1", "--warmup", "0", "--real-batches", "1"]
    options += ["--sequential"] if order == "sequential" else []
    report = main([*TINY, *options, "--batch", "2", "--length", "8", "--no-compile", "--threads", "1"])
    assert "| lora | " in report and "| hycam | " in report
    assert "Loop benchmark" not in report and "MoE-LoRA" not in report
    assert f"median of 1 {order}" in report


def test_activation_measurement_frees_the_graph(tmp_path):
    """Routers keep records of the last forward; after the measurement they no longer hold its graph (with
    every activation), which kept one graph per variant alive and ran a real model out of memory."""
    from mtpeft.bench.methods import random_batch, saved_activation_mb

    parts = RunParts.build(compose_run([*TINY, "method=hycam"], tmp_path))
    model = parts.fresh_method()
    batch = random_batch(2, 8, parts.tokenizer.vocab_size, parts.num_tasks, torch.device("cpu"))
    assert saved_activation_mb(model, batch, parts.num_tasks) > 0
    aux = sum(model.aux_losses().values())
    assert aux.requires_grad
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        aux.backward()


def test_unknown_variant_is_rejected():
    with pytest.raises(SystemExit):
        main(["--only", "moe"])


def test_variants_come_from_the_registry(monkeypatch):
    """Every registered method's declared ``bench_variants`` and nothing else, the reference first; a method
    that changes its declaration changes the benchmark without an edit in mtpeft/bench."""
    variants = method_variants()
    reference = reference_method()
    assert next(iter(variants)) == reference and variants[reference] == [f"method={reference}"]
    expected = {
        f"{name} {suffix}".strip(): [f"method={name}", *overrides]
        for name in available_methods()
        for suffix, overrides in get_method(name).bench_variants.items()
    }
    assert variants == expected
    assert {v[0].removeprefix("method=") for v in variants.values()} == {
        name for name in available_methods() if get_method(name).bench_variants
    }
    assert "moe_lora E=8 k=2 sparse" in variants  # declared by MoE-LoRA itself
    poly = get_method("poly")
    monkeypatch.setattr(poly, "bench_variants", {"skills=2": ("method.n_skills=2",)})
    assert method_variants()["poly skills=2"] == ["method=poly", "method.n_skills=2"]
    assert "poly" not in method_variants()


def test_trainer_peft_loop_builds_the_methods_peft_equivalent():
    """The Trainer + peft loop runs what the method says plain peft would build: the same trainable
    parameters as mtpeft's adapter; methods without an equivalent have no such loop."""
    import copy

    from peft import get_peft_model

    from tests.conftest import make_tiny_base

    base = make_tiny_base()
    counts = {}
    for name in available_methods():
        method = build_method(name, {}, copy.deepcopy(base), num_tasks=2)
        config = method.peft_equivalent()
        if config is not None:
            peft_model = get_peft_model(copy.deepcopy(base), config)
            counts[name] = (peft_model.get_nb_trainable_parameters()[0], method.count_parameters()[0])
    assert reference_method() in counts
    assert all(peft == ours for peft, ours in counts.values()), counts


def test_lightning_loop_logs_on_logging_steps_only(tmp_path):
    """Training metrics reach the logger every ``log_every_n_steps`` with the same names as before."""
    import pandas as pd

    overrides = [o for o in TINY if not o.startswith("trainer.log_every_n_steps")]
    cfg = compose_run(
        [*overrides, "method=moe_lora", "trainer.log_every_n_steps=2", *loop_config_overrides(4)], tmp_path
    )
    lightning_loop(RunParts.build(cfg), 4, tmp_path / "fit")
    metrics = pd.read_csv(next(tmp_path.glob("csv/**/metrics.csv")))
    logged = metrics.dropna(subset=["train/loss"])
    assert sorted(logged["step"]) == [1, 3]  # Lightning's logging steps for log_every_n_steps=2
    for key in ("train/aux/load_balance", "routing/entropy", "routing/layer0/expert0_load"):
        assert logged[key].notna().all(), key
    tasks = [
        c for c in metrics.columns if c.startswith("train/") and c.endswith("/loss") and c != "train/loss"
    ]
    assert tasks and set(tasks) <= {"train/qa/loss", "train/code/loss", "train/reasoning/loss"}


def test_evaluation_time_is_counted_per_prompt(tmp_path):
    """``eval_s_per_1000_prompts`` in results.json comes from these counters (val and test batches)."""
    from hydra.utils import instantiate

    from mtpeft.run import build_module

    cfg = compose_run([*TINY, "method=lora", "+trainer.limit_val_batches=1"], tmp_path)
    parts = RunParts.build(cfg)
    module = build_module(cfg, parts.fresh_method(), parts.tokenizer)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    trainer.validate(module, datamodule=parts.fresh_datamodule(), verbose=False)
    assert module.eval_prompts == cfg.evaluation.batch_size  # one batch of 9 of the 18 val prompts
    assert module.eval_seconds > 0
