"""The engines the distributed papers run on: Flower over Ray (``flower``) and Spark (``spark``).

Import the submodule you need (``from reprolab.distributed import flower``); each imports its engine lazily enough
that the other papers never load Ray or the JVM.
"""
