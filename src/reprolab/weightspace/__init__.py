"""Weights as data: model zoos, weight-space generation and loss-landscape measurements (issue 17)."""
