"""The framework every method builds on; the methods themselves live in `mtpeft.methods`.

* `base`: the `AdaptedModel` contract (forward/generate with ``task_ids``, save/load, merge, counts);
* `registry`: ``@register_method``, config parsing, ``build_method``, ``load_adapter``, method discovery;
* `inject`: find and wrap a base model's modules by name pattern;
* `task_context`: scoped forward pre-hooks that carry ``task_ids`` into layers;
* `lowrank`: low-rank (LoRA-style) building blocks and target shapes shared by the low-rank methods;
* `shapes`: the decoder's dimensions, for parameter formulas;
* `routing`: router records, token masks, balance losses and routing statistics of routed methods.

Nothing here imports a method module; the registry finds them on ``mtpeft.methods.__path__``.
"""
