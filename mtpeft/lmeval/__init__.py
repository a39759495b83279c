"""lm-evaluation-harness model type ``mtpeft``: the adapted model of any mtpeft run, any method, one task.

::

    python -m mtpeft.lmeval --model mtpeft --model_args run=<run dir>,task=qa --tasks <lm-eval task> [...]

``python -m mtpeft.lmeval`` (``__main__.py``) is lm-eval's own command line (``lm_eval run ...``, every
option as there) with the ``mtpeft`` model type registered: lm-eval 0.4.13 fills its model registry when
a module that calls ``@register_model`` is imported and has no plugin entry points, so the plain
``lm_eval`` command cannot see models of other packages. From Python, ``import mtpeft.lmeval`` and then
``lm_eval.simple_evaluate(model="mtpeft", model_args="run=<dir>,task=qa", ...)``.

``MtpeftLM`` is lm-eval's ``HFLM`` around the run's adapted model (`mtpeft.export.load_run`: the base
model rebuilt from the run's config, the adapter loaded): every forward and ``generate`` lm-eval makes
goes through the adapted model's own ``forward``/``generate`` with ``task_ids`` filled with the id of
``task`` (mtpeft's task-context mechanism; task-agnostic methods may omit ``task``). So loglikelihood and
generation tasks both work, for mergeable and input-dependent methods alike.

Model arguments: ``run`` (required), ``task`` (a task name of the run; required for task-conditioned
methods), ``device`` (default: ``cuda`` when available, else ``cpu``), ``batch_size``, and HFLM's
generation/tokenisation options.
mtpeft's own tasks are exported as lm-eval tasks with ``python -m mtpeft.export <run> --lmeval-task``
(then ``--include_path <out>/lmeval --tasks mtpeft_<task>_test``); their prompts already carry the run's
template and chat template, so do not add ``--apply_chat_template`` for them.
Needs the optional extra: ``pip install -e '.[lmeval]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # pragma: no cover - depends on the optional extra
    raise ImportError(
        "mtpeft.lmeval needs lm-evaluation-harness: pip install -e '.[lmeval]' (pinned lm-eval==0.4.13)"
    ) from err

from mtpeft.adapters.base import AdaptedModel
from mtpeft.export import load_run


class TaskBoundModel(nn.Module):
    """An adapted model with its task fixed, behind the interface HFLM calls on a Hugging Face model:
    ``model(input_ids).logits``, ``model.generate(input_ids=..., attention_mask=..., ...)``, ``config``,
    ``device``, ``name_or_path``, ``tie_weights()``."""

    def __init__(self, adapted: AdaptedModel, task_id: int | None) -> None:
        super().__init__()
        self.adapted = adapted
        self.task_id = task_id

    @property
    def config(self) -> Any:
        return self.adapted.base_model.config

    @property
    def device(self) -> torch.device:
        return next(self.adapted.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.adapted.base_model.parameters()).dtype

    @property
    def name_or_path(self) -> str:
        return getattr(self.adapted.base_model, "name_or_path", "")

    def tie_weights(self) -> None:
        """HFLM re-ties embeddings after loading; the base model was tied when it was loaded."""

    def task_ids(self, batch_size: int) -> torch.Tensor | None:
        if self.task_id is None:
            return None
        return torch.full((batch_size,), self.task_id, dtype=torch.long, device=self.device)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        task_ids = self.task_ids(input_ids.shape[0])
        return self.adapted(input_ids=input_ids, attention_mask=attention_mask, task_ids=task_ids, **kwargs)

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        task_ids = self.task_ids(input_ids.shape[0])
        return self.adapted.generate(
            input_ids=input_ids, attention_mask=attention_mask, task_ids=task_ids, **kwargs
        )


@register_model("mtpeft")
class MtpeftLM(HFLM):
    """lm-eval's HFLM scoring an mtpeft run's adapted model for one of its tasks (see the module docstring)."""

    def __init__(
        self,
        run: str,
        task: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        **kwargs: Any,
    ) -> None:
        loaded = load_run(Path(run))
        adapted = loaded.model
        if task is None and adapted.requires_task_ids:
            raise ValueError(
                f"method {adapted.method_name!r} of run {run} is task-conditioned: pass the task in "
                f"--model_args, e.g. run={run},task={loaded.tasks[0]} (its tasks: {loaded.tasks})"
            )
        task_id = loaded.task_id(task) if task is not None else None
        adapted.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))).eval()
        self.mtpeft_run = loaded
        self.mtpeft_task = task
        super().__init__(
            pretrained=TaskBoundModel(adapted, task_id),
            tokenizer=loaded.tokenizer,
            backend="causal",
            batch_size=batch_size,
            **kwargs,
        )

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records about the model: the run, method and task."""
        run = self.mtpeft_run
        trainable, total = run.model.count_parameters()
        return {
            "mtpeft_run": str(run.run_dir.resolve()),
            "mtpeft_method": run.model.method_name,
            "mtpeft_task": self.mtpeft_task,
            "model_num_parameters": total,
            "model_trainable_parameters": trainable,
            "model_dtype": str(self.model.dtype),
        }
