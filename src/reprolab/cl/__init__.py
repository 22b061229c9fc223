"""Continual learning: task-conditioned hypernetworks (and, later, per-task supermasks)."""
