"""Online data selection for training: which examples of each incoming batch are worth a backward pass.

``uds``: Utility-Diversity Sampling (nuclear-norm utility + sketch diversity against a FIFO memory), with random and
max-loss selectors as baselines; ``sft_data``: an instruction mix built from shipped data; ``sft``: fine-tuning the
last blocks of a causal LM on cached trunk features with any selector.
"""
