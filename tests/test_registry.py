"""The one `Registry` class and its `UnknownNameError`, as every registry of mtpeft uses them (methods,
tasks, data formats, metrics), and method discovery on ``mtpeft.methods.__path__``."""

from __future__ import annotations

import pytest

import mtpeft.methods
from mtpeft.adapters import registry as method_registry
from mtpeft.data.sources.formats import get_format
from mtpeft.data.tasks import get_task
from mtpeft.methods import available_methods, build_method, get_method
from mtpeft.metrics import get_metric
from mtpeft.utils.registry import Registry, UnknownNameError
from tests.conftest import make_tiny_base


def test_registry_registers_once_and_lists_sorted_names() -> None:
    registry: Registry[int] = Registry("widget")
    registry.register("b", 2)
    registry.register("a", 1)
    assert registry.names() == ["a", "b"]
    assert registry.get("a") == 1
    assert "b" in registry and "c" not in registry
    registry.register("a", 1)  # the same object again is a no-op (a module imported twice)
    with pytest.raises(ValueError, match="widget 'a' is already registered; choose another name"):
        registry.register("a", 3)


def test_unknown_name_error_is_key_and_value_error_with_a_plain_message() -> None:
    registry: Registry[int] = Registry("widget", hints=("w<k>",))
    registry.register("b", 2)
    registry.register("a", 1)
    with pytest.raises(UnknownNameError) as info:
        registry.get("c")
    err = info.value
    assert isinstance(err, KeyError) and isinstance(err, ValueError)
    assert str(err) == "unknown widget 'c'; valid widgets: a, b, w<k>"
    assert (err.kind, err.name, err.valid) == ("widget", "c", ["a", "b", "w<k>"])
    assert str(Registry("widget").unknown("x")) == "unknown widget 'x'; valid widgets: (none)"


def test_discover_runs_before_lookups() -> None:
    """``discover`` fills the registry on first use (as method discovery imports the method modules)."""
    registry: Registry[int] = Registry("widget", discover=lambda: registry.register("late", 1))
    assert registry.get("late") == 1
    assert registry.names() == ["late"]
    assert Registry("widget", discover=lambda: None).names() == []


@pytest.mark.parametrize(
    ("lookup", "message"),
    [
        (get_method, r"^unknown method 'nope'; valid methods: cpoly, hycam, lora, .*poly$"),
        (get_task, r"^unknown task 'nope'; valid tasks: .*\bcode\b.*\bqa\b"),
        (get_format, r"^unknown data format 'nope'; valid data formats: .*\balpaca\b"),
        (
            get_metric,
            r"^unknown metric 'nope'; valid metrics: bleu, evaluate:<name>, exact_match, .*pass@<k>",
        ),
    ],
)
def test_every_registry_raises_the_same_error(lookup: object, message: str) -> None:
    with pytest.raises(UnknownNameError, match=message):
        lookup("nope")  # type: ignore[operator]


def test_build_method_with_an_unknown_name_lists_the_methods() -> None:
    with pytest.raises(UnknownNameError, match="unknown method 'loraa'; valid methods: .*lora"):
        build_method("loraa", {}, make_tiny_base(), num_tasks=1)


def test_a_method_registers_its_class_once() -> None:
    lora = get_method("lora")
    assert lora.method_name == "lora"
    with pytest.raises(ValueError, match="method 'lora' is already registered by"):
        method_registry.register_method("lora")(type("Other", (lora,), {}))
    with pytest.raises(ValueError, match="must be a Python identifier"):
        method_registry.register_method("my-method")(lora)


def test_methods_package_holds_only_methods() -> None:
    """Every module on ``mtpeft.methods.__path__`` registers a method under its own name (no framework
    files left in the folder, so discovery needs no skip list)."""
    import pkgutil

    modules = sorted(
        i.name for i in pkgutil.iter_modules(mtpeft.methods.__path__) if not i.name.startswith("_")
    )
    assert modules == available_methods()


def test_discovery_searches_directories_appended_to_the_path(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "plugin_probe.py").write_text(
        "from mtpeft.adapters.base import AdaptedModel, MethodConfig\n"
        "from mtpeft.adapters.registry import register_method\n"
        "from mtpeft.utils.schema import config_dataclass\n\n\n"
        "@config_dataclass\nclass ProbeConfig(MethodConfig):\n    pass\n\n\n"
        '@register_method("plugin_probe")\nclass Probe(AdaptedModel):\n    config_class = ProbeConfig\n\n'
        "    def adapt(self) -> None:\n        pass\n"
    )
    monkeypatch.setattr(mtpeft.methods, "__path__", [*mtpeft.methods.__path__, str(tmp_path)])
    try:
        assert "plugin_probe" in available_methods()
        assert get_method("plugin_probe").__name__ == "Probe"
    finally:
        method_registry.METHODS._items.pop("plugin_probe", None)
        import sys

        sys.modules.pop("mtpeft.methods.plugin_probe", None)
