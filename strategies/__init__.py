"""Avalanche integration of cmtl (installed as `cmtl.strategies`)."""

from .build import EMTAL, CMTLJoint, CMTLStrategy, TaskLRSchedule, build_strategy, find_emtal_plugin
from .emtal import AvalancheCMTL, EMTALPlugin

__all__ = [
    "EMTAL",
    "AvalancheCMTL",
    "CMTLJoint",
    "CMTLStrategy",
    "EMTALPlugin",
    "TaskLRSchedule",
    "build_strategy",
    "find_emtal_plugin",
]
