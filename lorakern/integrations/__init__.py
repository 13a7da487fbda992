"""Integrations with other libraries: ``lorakern.integrations.peft.fuse(model)``, and many adapters
over one base (``lorakern.integrations.adapters``: load N PEFT folders, route samples per adapter)."""

from . import adapters, peft

__all__ = ["adapters", "peft"]
