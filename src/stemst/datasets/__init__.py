"""Public datasets, downloaded on request and cached (see :func:`her2st`)."""

from ._her2st import her2st, her2st_sections

__all__ = ["her2st", "her2st_sections"]
