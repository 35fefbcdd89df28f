"""The embedded default: `loramix demo` reproduces the paper's experiment end to end on synthetic domains."""

from .pipeline import run_demo

__all__ = ["run_demo"]
