"""The contract every method satisfies: a frozen base model wrapped into an `AdaptedModel`.

An adapted model

* runs ``forward(input_ids, attention_mask, task_ids=..., **hf_kwargs)`` and ``generate(...)`` like the
  Hugging Face model it wraps; task-conditioned methods (``requires_task_ids``) fail loudly when
  ``task_ids`` is missing or out of range, task-agnostic methods ignore it;
* exposes ``aux_losses()`` (already weighted, e.g. load balancing) and ``routing_stats()``;
* trains only its adapter parameters (the base is frozen before the method adapts it);
* saves and reloads its adapter state (safetensors + JSON config) to identical logits; a method may write
  a standard format instead (LoRA writes a plain peft directory) by overriding ``save_adapter_weights`` /
  ``load_adapter_weights``;
* knows, when its update is a per-task weight delta (LoRA, MultiLoRA, MTL-LoRA, Poly, C-Poly, MoE-LoRA
  with the task gate), the delta ``ΔW_t`` of every adapted linear (``merged_weight_deltas``), so a task's
  adapter can be merged into a standalone model (`merge_into`); input-dependent methods raise
  `NotMergeableError`;
* knows its trainable-parameter count from the closed-form formula of docs/methods.md
  (``expected_trainable_parameters``), which the contract tests compare with the real count.

A method subclasses `AdaptedModel`, sets ``config_class`` to a dataclass, implements ``adapt`` (wrap or
hook modules of ``self.base_model``) and ``expected_trainable_parameters``, and registers itself with
``@register_method("name")``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mtpeft.adapters.inject import replace_module
from mtpeft.adapters.task_context import task_id_scope
from mtpeft.utils.schema import config_dataclass

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
"""peft's config file name. Directories written before the mtpeft meta file existed keep the mtpeft meta
(``method``, ``num_tasks``, ``config``) in this file; `load_adapter` still reads them."""
METHOD_META = "mtpeft_adapter.json"
"""mtpeft's own record of an adapter directory: method name, number of tasks, method config."""


class NotMergeableError(TypeError):
    """The method's update depends on the input (routing, modulation, prompts), so it is no weight delta."""


@config_dataclass
class MethodConfig:
    """Base class of method configs: ``@config_dataclass`` classes (`mtpeft.utils.schema`) whose typed fields
    are documented where they are declared; building one validates it."""


class AdaptedModel(nn.Module):
    """A frozen Hugging Face causal LM plus one method's adapter (see the module docstring)."""

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    method_name: ClassVar[str] = ""
    #: True when the adapter needs one task id per sequence at training and inference. Read it on the
    #: instance: this class-level value is the default of methods where it never varies (a class attribute
    #: ``requires_task_ids = True`` for Poly), a method whose config decides overrides it with a property
    #: computed from ``self.config`` (MoE-LoRA: only its task gate needs ids).
    requires_task_ids: bool = False
    #: True when, with default init, the adapted model's logits equal the base model's.
    identity_at_init: ClassVar[bool] = True
    #: The method's variants in the per-method benchmark (``python -m mtpeft.bench``): label suffix -> config
    #: overrides (``method.<key>=<value>``), each timed as ``method=<name> <overrides>`` and labelled
    #: ``<name> <suffix>``. Default: the method as its ``conf/method/<name>.yaml`` sets it. A method lists its
    #: speed-relevant settings here (HyCAM's dispatch, MoE-LoRA's experts); one with nothing to train, none.
    bench_variants: ClassVar[dict[str, tuple[str, ...]]] = {"": ()}
    #: True for the one method the benchmark's ratios are relative to (its first variant is the reference
    #: row of the per-method table; the loop table trains it unless told otherwise).
    bench_reference: ClassVar[bool] = False

    def __init__(self, base_model: nn.Module, config: MethodConfig, num_tasks: int) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.config = config
        self.num_tasks = num_tasks
        self._scoped_task_ids: torch.Tensor | None = None
        base_model.requires_grad_(False)
        base_ids = {id(p) for p in base_model.parameters()}
        self._base_state_names = frozenset(base_model.state_dict())  # before adapt() adds or renames any
        self.base_model = base_model
        self.adapt()
        self._adapter_names = frozenset(
            name for name, p in self.named_parameters() if id(p) not in base_ids or p.requires_grad
        )
        self._adapter_enabled = True
        # base parameters the adapter trains (HyCAM's RMSNorm weights), as the base had them: disable_adapter
        self._base_values = {
            name: p.detach().clone()
            for name, p in self.named_parameters()
            if id(p) in base_ids and p.requires_grad
        }

    # -- what a method implements ---------------------------------------------------------------
    def adapt(self) -> None:
        """Attach the adapter to ``self.base_model`` (wrap linears, add hooks, new parameters)."""
        raise NotImplementedError

    def expected_trainable_parameters(self) -> int:
        """Trainable-parameter count from the docs/methods.md formula for this config and base shape."""
        raise NotImplementedError

    def task_conditioned_modules(self) -> Iterable[nn.Module]:
        """Modules whose ``forward`` takes a ``task_ids`` keyword (injected per call)."""
        return ()

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses of the last forward, already multiplied by their coefficients."""
        return {}

    def routing_stats(self) -> dict[str, float]:
        """Routing statistics of the last forward (expert/CAM usage, entropy) for logging."""
        return {}

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups; methods may give parts their own learning rate ("lr" key)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": weight_decay}]

    def peft_equivalent(self) -> Any | None:
        """A peft config (``peft.PeftConfig``) that builds this same adapter with plain peft on the same base,
        for comparisons with peft (the benchmark's ``transformers.Trainer`` + peft loop); None (the default)
        when peft has no equivalent."""
        return None

    # -- running --------------------------------------------------------------------------------
    def check_task_ids(self, task_ids: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """Validate ``task_ids`` (LongTensor[B], values in [0, num_tasks)) for task-conditioned methods."""
        if task_ids is None:
            if self.requires_task_ids:
                raise ValueError(
                    f"method {self.method_name!r} is task-conditioned and needs task_ids "
                    "(a LongTensor with one task id per sequence) in forward() and generate()"
                )
            return None
        task_ids = torch.as_tensor(task_ids, dtype=torch.long)
        if task_ids.dim() != 1 or task_ids.shape[0] != batch_size:
            raise ValueError(f"task_ids must have shape [{batch_size}], got {tuple(task_ids.shape)}")
        # the range check reads the ids' values; a compiled forward has them checked eagerly before
        check_range = self.requires_task_ids and not torch.compiler.is_compiling()
        if check_range and (task_ids.min() < 0 or task_ids.max() >= self.num_tasks):
            raise ValueError(
                f"task_ids {task_ids.tolist()} out of range for method {self.method_name!r} "
                f"trained with {self.num_tasks} tasks (valid: 0..{self.num_tasks - 1})"
            )
        return task_ids

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        batch = _batch_size(input_ids, kwargs)
        task_ids = self.check_task_ids(task_ids, batch)
        with self.task_scope(task_ids):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        task_ids = self.check_task_ids(task_ids, input_ids.shape[0])
        with self.task_scope(task_ids):
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @contextmanager
    def task_scope(self, task_ids: torch.Tensor | None) -> Iterator[None]:
        """Inject ``task_ids`` into the task-conditioned modules for one forward/generate call.

        The ids are also kept on the model while the call runs, so that activation checkpointing can
        re-open the same scope when it recomputes a layer during backward (see
        ``gradient_checkpointing_enable``).
        """
        previous, self._scoped_task_ids = self._scoped_task_ids, task_ids
        static = getattr(self, "_static_task_hooks", None)
        try:
            if static is None:
                with task_id_scope(self.task_conditioned_modules(), task_ids):
                    yield
            else:
                previous_static, static.task_ids = static.task_ids, task_ids
                try:
                    yield
                finally:
                    static.task_ids = previous_static
        finally:
            self._scoped_task_ids = previous

    def use_static_task_hooks(self) -> None:
        """Keep the task-id hooks registered for good; `task_scope` then only sets the ids they inject.

        For ``torch.compile``: registering hooks inside a compiled forward breaks the graph, and hooks
        registered per call outside it would be traced once and then read stale ids. A persistent hook
        whose ids change per call traces into the graph. The same ids reach the same layers.
        """
        if getattr(self, "_static_task_hooks", None) is None:
            hooks = task_id_scope(self.task_conditioned_modules(), None)
            hooks.__enter__()  # never exited: the hooks live as long as the model
            self._static_task_hooks = hooks

    def _checkpoint_contexts(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        """(forward, recompute) contexts for ``torch.utils.checkpoint``: the recomputation of a layer
        during backward runs after ``task_scope`` closed, so it re-injects the ids of its own forward."""
        return nullcontext(), task_id_scope(self.task_conditioned_modules(), self._scoped_task_ids)

    def gradient_checkpointing_enable(self) -> None:
        """Non-reentrant checkpointing, so aux losses stored during forward keep their gradients and
        task-conditioned layers see their task ids again when recomputed."""
        self.base_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": self._checkpoint_contexts}
        )

    # -- the base model alone ---------------------------------------------------------------------
    @property
    def adapter_enabled(self) -> bool:
        """False inside `disable_adapter`."""
        return self._adapter_enabled

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block ``forward`` and ``generate`` compute the frozen base model alone (peft's
        ``disable_adapter``): the base's logits on the same batch without a second copy of the base.

        Method-agnostic: every wrapped module (one that keeps the frozen module as ``base_layer``: peft's
        LoRA and Poly layers, `LowRankLinear`) is swapped back for its base layer, and base parameters the
        adapter trains hold their values from before the adapter was built. A method that changes the
        computation in another way takes that off in `detach_hooks` (hooks) or checks `adapter_enabled`
        in its own ``forward``/``generate``. Everything is back when the block ends.
        """
        if not self._adapter_enabled:  # nested: already the base model
            yield
            return
        wrappers = _outermost_wrappers(self.base_model)
        params = dict(self.named_parameters())
        trained = {name: params[name].data for name in self._base_values}
        self._adapter_enabled = False
        try:
            for name, wrapper in wrappers:
                replace_module(self.base_model, name, wrapper.base_layer)
            for name, value in self._base_values.items():
                params[name].data = value.to(trained[name].device)
            with self.detach_hooks():
                yield
        finally:
            for name, data in trained.items():
                params[name].data = data
            for name, wrapper in wrappers:
                replace_module(self.base_model, name, wrapper)
            self._adapter_enabled = True

    def detach_hooks(self) -> AbstractContextManager:
        """A context in which the method's own hooks on base-model modules are off (`disable_adapter`);
        methods that adapt through hooks override it (HyCAM), the default has none to take off."""
        return nullcontext()

    # -- bookkeeping ----------------------------------------------------------------------------
    def count_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def upcast_trainable(self, dtype: torch.dtype = torch.float32) -> int:
        """Store every trainable floating-point parameter in ``dtype`` (default fp32); return how many moved.

        With a half-precision base (``model.dtype=bfloat16``) the adapters would otherwise be created in
        bf16, whose 8-bit mantissa swallows small AdamW updates; peft upcasts adapters for the same reason
        (``autocast_adapter_dtype``). The frozen base stays in its own dtype; every method casts
        activations to its parameters' dtype and back. A *base* module whose parameters the adapter trains
        (HyCAM's RMSNorm weights with ``train_layernorms``) would now return ``dtype`` activations into the
        base's half-precision layers, so its output is cast back to the base dtype (`_cast_output_to`).
        """
        moved = 0
        for name, param in self.named_parameters():
            if param.requires_grad and param.is_floating_point() and param.dtype != dtype:
                if name in self._base_values:
                    owner = self.get_submodule(name.rpartition(".")[0])
                    owner.register_forward_hook(functools.partial(_cast_output_to, param.dtype))
                param.data = param.data.to(dtype)
                moved += 1
        return moved

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's state as it was loaded, for `mtpeft.models.loader.weights_digest`: read inside
        `disable_adapter` (wrapped modules swapped back, trained base parameters at their loaded values) and
        limited to the base's own entries (not what the method attached to it, e.g. HyCAM's CAMs)."""
        with self.disable_adapter():
            state = self.base_model.state_dict()
        return {name: tensor for name, tensor in state.items() if name in self._base_state_names}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's state: parameters the method added plus base parameters it trains."""
        return {n: p.detach() for n, p in self.named_parameters() if n in self._adapter_names}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load adapter state; missing or unexpected keys are an error."""
        missing = sorted(self._adapter_names - set(state))
        unexpected = sorted(set(state) - self._adapter_names)
        if missing or unexpected:
            raise KeyError(f"adapter state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def save_adapter(self, directory: str | Path) -> Path:
        """Write the adapter weights (`save_adapter_weights`) and ``mtpeft_adapter.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_adapter_weights(directory)
        meta = {
            "method": self.method_name,
            "num_tasks": self.num_tasks,
            "config": dataclasses.asdict(self.config),
        }
        (directory / METHOD_META).write_text(json.dumps(meta, indent=2))
        return directory

    def save_adapter_weights(self, directory: Path) -> None:
        """Write the adapter state as ``adapter_model.safetensors`` (mtpeft's parameter names)."""
        tensors = {n: t.contiguous().clone() for n, t in self.adapter_state_dict().items()}
        save_file(tensors, str(directory / ADAPTER_WEIGHTS))

    def load_adapter_weights(self, directory: Path) -> None:
        """Read what `save_adapter_weights` wrote (methods that override one override both)."""
        self.load_adapter_state_dict(load_file(str(directory / ADAPTER_WEIGHTS)))

    # -- merging --------------------------------------------------------------------------------
    def merged_weight_deltas(self, task_id: int) -> dict[str, torch.Tensor]:
        """``{linear name in the base model: ΔW_t [d_out, d_in]}`` such that ``W0 + ΔW_t`` reproduces the
        adapted model for task ``task_id`` (eval mode: no dropout, no routing noise).

        Only methods whose update is a per-task weight delta implement it; the default raises.
        """
        raise self._not_mergeable()

    @property
    def mergeable(self) -> bool:
        """Whether the method implements `merged_weight_deltas` (its update is a per-task weight delta); a
        method that merges only in some configurations overrides it."""
        return type(self).merged_weight_deltas is not AdaptedModel.merged_weight_deltas

    def check_mergeable(self) -> None:
        """Raise `NotMergeableError` for a method that cannot be merged: before a base copy is loaded."""
        if not self.mergeable:
            raise self._not_mergeable()

    @property
    def not_mergeable_reason(self) -> str:
        """Why `merged_weight_deltas` refuses (the clause after "cannot be merged into the base weights:");
        a method that merges only in some configurations names the configuration."""
        return "its update depends on the input (routing, modulation or prompts), not only on the task"

    def _not_mergeable(self) -> NotMergeableError:
        return NotMergeableError(
            f"method {self.method_name!r} cannot be merged into the base weights: "
            f"{self.not_mergeable_reason}. Evaluate it with the adapter instead (python -m mtpeft.lmeval "
            "--model mtpeft --model_args run=<run dir>,task=<t>)"
        )

    def check_task_id(self, task_id: int) -> int:
        """``task_id`` as an int in ``[0, num_tasks)``; a clear error otherwise."""
        if isinstance(task_id, bool) or not 0 <= int(task_id) < self.num_tasks:
            raise ValueError(
                f"task id {task_id!r} out of range for method {self.method_name!r} trained with "
                f"{self.num_tasks} tasks (valid: 0..{self.num_tasks - 1})"
            )
        return int(task_id)

    @torch.no_grad()
    def merge_into(self, base_model: nn.Module, task_id: int) -> nn.Module:
        """Add task ``task_id``'s weight deltas to a plain copy of the base model (in place) and return it.

        ``base_model`` must be a fresh, unadapted model of the same architecture (e.g. loaded again
        with `mtpeft.models.loader.load_base_model`); each delta is computed in the adapter's dtype, added
        to the weight in fp32 (or in the wider of the two dtypes) and the sum rounded once to the weight's
        dtype: a bf16 weight becomes ``round_bf16(W0 + ΔW)``, not ``round_bf16(W0 + round_bf16(ΔW))``.
        """
        was_training = self.training
        self.eval()
        try:
            deltas = self.merged_weight_deltas(self.check_task_id(task_id))
        finally:
            self.train(was_training)
        for name, delta in deltas.items():
            weight = base_model.get_submodule(name).weight
            if weight.shape != delta.shape:
                raise ValueError(
                    f"{name}: delta of shape {tuple(delta.shape)} for weight {tuple(weight.shape)}"
                )
            wide = torch.promote_types(torch.promote_types(weight.dtype, delta.dtype), torch.float32)
            total = weight.to(wide) + delta.to(device=weight.device, dtype=wide)
            weight.copy_(total.to(weight.dtype))  # one rounding, of the sum
        return base_model


def read_adapter_meta(directory: str | Path) -> tuple[dict[str, Any], bool]:
    """``(meta, legacy)``: the method/num_tasks/config record of an adapter directory, and whether it is
    the earlier layout (meta inside ``adapter_config.json``)."""
    directory = Path(directory)
    if (directory / METHOD_META).is_file():
        return json.loads((directory / METHOD_META).read_text()), False
    legacy = directory / ADAPTER_CONFIG
    if legacy.is_file():
        meta = json.loads(legacy.read_text())
        if "method" in meta:
            return meta, True
    raise FileNotFoundError(
        f"{directory} is not an mtpeft adapter directory: it has no {METHOD_META} (written by "
        "AdaptedModel.save_adapter, e.g. <run dir>/adapter/)"
    )


def _outermost_wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the modules of ``model`` that wrap a frozen ``base_layer``, outermost only."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        inner = getattr(module, "base_layer", None)
        inside = any(name.startswith(outer + ".") for outer, _ in found)
        if isinstance(inner, nn.Module) and not inside:
            found.append((name, module))
    return found


def _batch_size(input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> int:
    if input_ids is not None:
        return input_ids.shape[0]
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        raise ValueError("forward() needs input_ids or inputs_embeds")
    return embeds.shape[0]


def _cast_output_to(dtype: torch.dtype, module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: a floating-point tensor output back in ``dtype`` (an upcast trained base module)."""
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return output.to(dtype)
    return output
