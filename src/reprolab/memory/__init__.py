"""Memory-efficient training: measuring what training keeps in memory, and methods that keep less.

* ``meter``: saved-activation meter (``saved_tensors_hooks``), peak tensor memory of a step, exact byte accounting.
* ``wta_crs``: Winner-Take-All Column-Row Sampling linear layers (arXiv 2305.15265).
* ``coat_fp8``: COAT's FP8 optimizer states with dynamic range expansion and FP8 activations (arXiv 2410.19313);
  the FP8 E4M3 quantizers themselves live in ``reprolab.quant.fp8``.
* ``text_tasks``: small tasks built from the shipped texts (author passages, a character-level corpus).
"""
