"""Embedding compression for CTR models: CAFE (arXiv 2312.03256) and the embedding-compression benchmark
(arXiv 2311.15578). Data in :mod:`.data`, tables in :mod:`.tables`, CAFE in :mod:`.cafe`, model/training in
:mod:`.model`."""
from .cafe import CafeEmbedding, HotSketch, naive_cafe_lookup, universal_hash
from .data import CTRData, ml100k_ctr, zipf_ctr_stream
from .model import DLRMLite, evaluate, evaluate_post_training, make_table, run_arm, train
from .tables import (FullEmbedding, HashEmbedding, MDEmbedding, PrunedEmbedding, QATEmbedding, QREmbedding,
                     QuantizedEmbedding,
                     full_bytes, prune_table, quantize_table)

__all__ = ["CafeEmbedding", "HotSketch", "naive_cafe_lookup", "universal_hash", "CTRData", "ml100k_ctr",
           "zipf_ctr_stream", "DLRMLite", "evaluate", "evaluate_post_training", "make_table", "run_arm", "train",
           "FullEmbedding", "HashEmbedding", "MDEmbedding", "PrunedEmbedding", "QATEmbedding", "QREmbedding", "QuantizedEmbedding",
           "full_bytes", "prune_table", "quantize_table"]
