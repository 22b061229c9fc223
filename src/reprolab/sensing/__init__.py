"""Sensing papers (CrossFi): few-shot cross-domain recognition on sensing time series."""
