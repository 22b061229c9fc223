"""reprolab: miniature, reproducible re-implementations of recent ML papers.

Shared kernels and models live in family subpackages (``dp``, ``quant``, ``graph``, ``lm``, ``data``, ``report``);
a paper's own method lives in one file named after the paper. Notebooks under ``notebooks/`` import from here.
"""

__all__ = ["paths", "config", "results"]
