"""Relational reasoning: Neural Logic Machines (dense and sparse, SpaLoc) and KGQA instruction GNNs (ReaRev)."""
