"""Integrations with other libraries: ``lorakern.integrations.peft.fuse(model)``."""

from . import peft

__all__ = ["peft"]
