"""The convergence check of a study (``check`` in its experiment config): is the ranking an artefact of the
budget?

A study compares methods at one budget. If the validation curves are still rising when it ends, the ranking
is taken mid-climb and favours the methods that learn fastest, not those that end best. The ``check`` stage
runs after the final one: the same methods with the values the tuning chose, at a longer budget (or under
any other change the ``overrides`` make), on a few seeds::

    check:
      overrides: [trainer.max_steps=360]   # what the check changes (required); applied to every check job
      seeds: [0]                           # default: the study's first seed
      methods: [lora, hycam, mtl_lora]     # default: every tuned method (every method if nothing is tuned)

Its runs are ordinary jobs (resumable, skipped once finished, published as ``check_<method>_..._s<seed>_<hash>``).
`write_check` writes ``experiments/<name>/check/``: the check runs' own tables (``results.md``, and
``convergence.md``: do the longer curves flatten?) and ``ranking.md``, the study's ranking at its own budget
(final runs of the same methods and seeds) against the check's (`mtpeft.results.ranking`: rank intervals and
Kendall's tau between the two), when at least `MIN_SHARED` methods ran both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from mtpeft.results import load_runs, summarise
from mtpeft.results.ranking import MIN_SHARED, records_rows, study_rows, write_ranking

if TYPE_CHECKING:
    from mtpeft.study.config import Study

log = logging.getLogger(__name__)
CHECK_KEYS = ("overrides", "seeds", "methods")
"""The keys of a ``check`` section."""


def validate_check(study: Study) -> None:
    """A ``check`` section has known keys, a non-empty list of ``key=value`` overrides, and methods (when
    given) that the study sweeps. (Its seeds: `validate_check_seeds`; what its overrides do:
    `validate_check_effect`.)"""
    check = study.check
    if check is None:
        return
    where = f"conf/experiment/{study.name}.yaml: check"
    if not isinstance(check, dict):
        raise SystemExit(f"{where} must be a mapping with keys {', '.join(CHECK_KEYS)}, got {check!r}")
    unknown = sorted(set(check) - set(CHECK_KEYS))
    if unknown:
        raise SystemExit(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(CHECK_KEYS)}")
    overrides = check.get("overrides")
    if not isinstance(overrides, list) or not overrides or not all(_is_override(o) for o in overrides):
        raise SystemExit(
            f"{where}.overrides: a non-empty list of key=value overrides (what the check changes, e.g. "
            f"[trainer.max_steps=360]), got {overrides!r}"
        )
    for key in ("seeds", "methods"):
        value = check.get(key)
        if value is not None and (not isinstance(value, list) or not value):
            raise SystemExit(f"{where}.{key}: a non-empty list or null, got {value!r}")
    strange = [m for m in check.get("methods") or [] if m not in study.methods]
    if strange:
        raise SystemExit(
            f"{where}.methods: {', '.join(strange)} not among the study's ({', '.join(study.methods)})"
        )


def _is_override(text: Any) -> bool:
    return isinstance(text, str) and "=" in text and not text.startswith("=")


def validate_check_seeds(study: Study) -> None:
    """The check's seeds are seeds of the final stage (its ranking compares runs of the same seeds)."""
    if study.check is None:
        return
    strange = [seed for seed in check_seeds(study) if seed not in study.seeds]
    if strange:
        raise SystemExit(
            f"conf/experiment/{study.name}.yaml: check.seeds: {', '.join(strange)} not among the final "
            f"stage's seeds ({', '.join(study.seeds)}): the check is ranked against the final runs of its seeds"
        )


def validate_check_effect(
    study: Study, declared: DictConfig, compose: Callable[[list[str]], DictConfig]
) -> None:
    """``check.overrides`` are single values of keys the jobs have, not the seed, the method or a tuned key
    (the check runs the chosen values; its seeds are ``check.seeds``), and they change the jobs' config
    (else the check jobs would be the final jobs again). ``declared``: a job's config as the study composes
    it; ``compose(extra)``: the same with ``extra`` overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    where = f"conf/experiment/{study.name}.yaml: check.overrides"
    overrides = list(study.check["overrides"])
    tuned = {key for method in study.methods for key in study.grid(method) or {}}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if override.is_sweep_override():
            raise SystemExit(f"{where}: {override.input_line} sweeps; the check runs one value per key")
        if key in ("seed", "method") or key in tuned:
            what = "check.seeds" if key == "seed" else "check.methods" if key == "method" else "the tuning"
            raise SystemExit(f"{where}: {override.input_line} sets {key}, which {what} decides")
    try:
        checked = compose(overrides)
    except Exception as error:  # Hydra's composition errors name the key
        raise SystemExit(f"{where}: {overrides} do not compose with the study: {error}") from None
    if _job_part(checked, study.runner_keys) == _job_part(declared, study.runner_keys):
        raise SystemExit(f"{where}: {overrides} change nothing in the jobs' config (the study's own values?)")


def _job_part(cfg: DictConfig, runner_keys: Sequence[str]) -> dict[str, Any]:
    """A composed config without Hydra's section and the runner's keys: what a job's config holds."""
    container = OmegaConf.to_container(cfg, resolve=False)
    return {key: value for key, value in container.items() if key != "hydra" and key not in runner_keys}


def check_seeds(study: Study) -> list[str]:
    """The check's seeds: ``check.seeds``, or the study's first seed."""
    seeds = (study.check or {}).get("seeds")
    return [str(s) for s in seeds] if seeds else study.seeds[:1]


def check_budget(study: Study) -> int | None:
    """The optimiser steps ``check.overrides`` give the check's jobs (``trainer.max_steps=N``), else None
    (`mtpeft.study.status` times the check by it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [str(o) for o in (study.check or {}).get("overrides") or []]
    steps = None
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.key_or_group == "trainer.max_steps" and not override.is_sweep_override():
            steps = override.value()  # the last one wins, as in Hydra
    return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else None


def check_methods(study: Study) -> list[str]:
    """The check's methods: those of ``check.methods`` the study runs (``method=`` on the command line can
    narrow it), or every tuned method (every method when none is tuned)."""
    listed = (study.check or {}).get("methods")
    if listed:
        return [str(m) for m in listed if str(m) in study.methods]
    tuned = [m for m in study.methods if study.grid(m) is not None]
    return tuned or list(study.methods)


def write_check(
    study: Study, final_dirs: Sequence[Path], check_dirs: Sequence[Path], out: Path, plots: bool = True
) -> list[Path]:
    """``<out>/check/``: the check runs' tables and their ranking against the final runs of the same methods
    and seeds (at the study's budget)."""
    check_out = out / "check"
    change = " ".join(study.check["overrides"])
    if not load_runs(check_dirs, "test"):
        log.warning("check of %s: no check run finished (see the sweeps' logs): no check tables", study.name)
        return []
    result = summarise(check_dirs, check_out, f"{study.name}: check ({change})", plots=plots)
    seeds, methods = set(check_seeds(study)), set(check_methods(study))
    finals = [r for r in load_runs(final_dirs, "test") if str(r["seed"]) in seeds and r["method"] in methods]
    if not finals:
        log.info("check of %s: no final runs of its methods and seeds to rank against", study.name)
        return result["files"]
    at_budget = records_rows(study.name, finals, "a")
    checked = study_rows(f"check ({change})", result["table"], result["columns"], result["records"], "b")
    shared = set(at_budget.averages) & set(checked.averages)
    if len(shared) < MIN_SHARED:
        log.info(
            "check of %s: %d method(s) in both, no ranking (needs %d)", study.name, len(shared), MIN_SHARED
        )
        return result["files"]
    return result["files"] + write_ranking(at_budget, checked, check_out)
