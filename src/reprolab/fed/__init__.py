"""Federated and decentralised learning papers (run on Flower over Ray: ``reprolab.distributed.flower``)."""
