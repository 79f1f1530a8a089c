"""scvi-scale: scVI (Lopez et al. 2018) trained out of core, faithful to scvi-tools."""

from __future__ import annotations

__version__ = "0.1.0"
