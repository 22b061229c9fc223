"""Reports: the index of every paper's claims (``python -m reprolab.report.index``)."""
