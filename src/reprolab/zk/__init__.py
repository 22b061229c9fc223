"""Sumcheck-based proofs of training (zkDL, arXiv 2307.16273): field arithmetic, MLEs, Fiat-Shamir, sumcheck."""
