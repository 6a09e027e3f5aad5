"""The installed version of stemst, for modules that record it (the package root re-exports it)."""

from importlib.metadata import version

__version__ = version("stemst")
