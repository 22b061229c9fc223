"""Equivariant networks: SO(3) tensor products, equivariant potentials and their checks."""
