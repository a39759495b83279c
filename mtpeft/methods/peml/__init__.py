"""PEML-style prompt + LoRA (docs/methods.md 8): ``config.py`` (search space), ``encoders.py`` (seeds and
prompt encoders), ``model.py`` (the registered ``peml`` method)."""

from mtpeft.methods.peml.config import EncoderConfig, PemlConfig, PromptConfig
from mtpeft.methods.peml.model import PEML, expected_parameters

__all__ = ["PEML", "EncoderConfig", "PemlConfig", "PromptConfig", "expected_parameters"]
