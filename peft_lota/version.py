"""The package version (a leaf: formats record it in the checkpoints they write)."""

__version__ = "0.1.0"
