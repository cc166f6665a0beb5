"""cmtl: continual multi-task learning for Vision Transformers (EMTAL, arXiv 2501.06884)."""

from cmtl.version import __version__

__all__ = ["__version__"]
