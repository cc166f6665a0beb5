"""Avalanche integration of cmtl (installed as `cmtl.strategies`)."""

from .emtal import AvalancheCMTL, EMTALPlugin

__all__ = ["AvalancheCMTL", "EMTALPlugin"]
