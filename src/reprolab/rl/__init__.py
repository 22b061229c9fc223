"""Reinforcement learning: tree actor-critics (GBRL, arXiv 2407.08250)."""
