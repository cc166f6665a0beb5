"""cmtl: continual multi-task learning for Vision Transformers (EMTAL, arXiv 2501.06884)."""

from cmtl.version import __version__

__all__ = ["__version__", "load_snapshot"]


def __getattr__(name: str):
    # lazy, so that `import cmtl` stays light (no torch/timm until a snapshot is loaded)
    if name == "load_snapshot":
        from cmtl.snapshot import load_snapshot

        return load_snapshot
    raise AttributeError(f"module 'cmtl' has no attribute {name!r}")
