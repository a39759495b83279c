"""The typed config layer (`mtpeft.utils.schema`): strict types, plain containers first, and messages that
name the full key, the file and the valid keys or values."""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

import pytest
from omegaconf import OmegaConf
from pydantic import BaseModel, Field

from mtpeft.utils.schema import (
    CONFIG,
    Bool,
    ConfigError,
    Float,
    Int,
    PositiveInt,
    Str,
    arguments_model,
    checked_arguments,
    config_dataclass,
    parse,
    to_plain,
)


@config_dataclass
class Inner:
    hidden: PositiveInt | None = None
    layers: PositiveInt = 2


@config_dataclass
class Outer:
    rate: Float = 0.5
    steps: Int = 3
    flag: Bool = False
    mode: Literal["a", "b"] = "a"
    inner: Inner = field(default_factory=Inner)
    names: list[Str] = field(default_factory=lambda: ["x"])

    def __post_init__(self) -> None:
        if self.flag and self.mode == "b":
            raise ValueError("flag=true needs mode a")


class Tiny(BaseModel):
    model_config = CONFIG
    kind: Literal["tiny"] = "tiny"
    width: PositiveInt = 4


class Hub(BaseModel):
    model_config = CONFIG
    kind: Literal["hub"] = "hub"
    path: Str | None = None


Node = Annotated[Tiny | Hub, Field(discriminator="kind")]


def _message(cls: object, values: object, where: str = "method", source: str | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        parse(cls, values, where, source)
    assert isinstance(err.value, ValueError)
    return str(err.value)


def test_numbers_are_strict_but_an_integer_is_a_number() -> None:
    parsed = parse(Outer, {"rate": 1, "steps": 2}, "method")
    assert parsed.rate == 1.0 and isinstance(parsed.rate, float) and parsed.steps == 2
    assert "method.rate=True is not valid" in _message(Outer, {"rate": True})
    assert "true/false is not a number" in _message(Outer, {"steps": False})
    assert "method.steps=1.5 is not valid: Input should be a valid integer" in _message(Outer, {"steps": 1.5})
    assert "method.flag='yes' is not valid" in _message(Outer, {"flag": "yes"})
    assert "method.names[1]=3 is not valid" in _message(Outer, {"names": ["a", 3]})


def test_omegaconf_nodes_parse_like_plain_dicts() -> None:
    cfg = OmegaConf.create({"base": 4, "method": {"steps": "${base}", "inner": {"layers": 3}}})
    parsed = parse(Outer, cfg.method, "method")
    assert parsed.steps == 4 and parsed.inner.layers == 3
    assert to_plain(cfg.method) == {"steps": 4, "inner": {"layers": 3}}
    assert type(to_plain(OmegaConf.create([1, {"a": 2}]))[1]) is dict


def test_unknown_nested_key_names_path_file_and_valid_keys() -> None:
    message = _message(Outer, {"inner": {"hiden": 3}}, source="conf/method/x.yaml")
    assert message == (
        "unknown key method.inner.hiden: 'hiden' is not an option of method.inner (did you mean 'hidden'?); "
        "valid keys: hidden, layers (conf/method/x.yaml)"
    )


def test_literal_range_cross_field_and_several_errors() -> None:
    assert "method.mode='c' is not valid: Input should be 'a' or 'b'" in _message(Outer, {"mode": "c"})
    assert "method.inner.layers=0 is not valid: Input should be greater than or equal to 1" in _message(
        Outer, {"inner": {"layers": 0}}
    )
    assert _message(Outer, {"flag": True, "mode": "b"}) == "method.flag=true needs mode a"
    both = _message(Outer, {"steps": "x", "zz": 1})
    assert both.startswith("2 invalid settings: ") and "method.steps='x'" in both and "method.zz" in both


def test_discriminated_union_paths_skip_the_tag() -> None:
    assert parse(Node, {"kind": "hub", "path": "p"}, "model") == Hub(path="p")
    assert _message(Node, {"kind": "tiny", "width": 0}, "model").startswith("model.width=0 is not valid")
    assert (
        _message(Node, {"kind": "gguf"}, "model")
        == "model.kind='gguf' is not valid: use one of 'tiny', 'hub'"
    )
    assert _message(Node, {}, "model") == "model.kind is required: use one of 'tiny', 'hub'"
    assert "valid keys: kind, path" in _message(Node, {"kind": "hub", "width": 3}, "model")


def test_a_config_dataclass_validates_when_built_in_code() -> None:
    with pytest.raises(ValueError, match="layers"):
        Inner(layers=0)
    with pytest.raises(ValueError, match="flag=true needs mode a"):
        Outer(flag=True, mode="b")


def test_checked_arguments_and_arguments_model_use_the_signature() -> None:
    @checked_arguments("data")
    def build(tasks: dict, batch_size: PositiveInt = 8, shuffle: Bool = True) -> tuple[dict, int, bool]:
        return tasks, batch_size, shuffle

    assert build(OmegaConf.create({"qa": {"train": 2}}), batch_size=4) == ({"qa": {"train": 2}}, 4, True)
    with pytest.raises(ConfigError, match=r"^data\.batch_size=0 is not valid"):
        build({}, batch_size=0)
    schema = arguments_model(build, skip=("tasks",))
    assert list(schema.model_fields) == ["batch_size", "shuffle"]
    assert "unknown key data.shufle" in _message(schema, {"shufle": False}, "data")
