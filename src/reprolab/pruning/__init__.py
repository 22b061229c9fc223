"""Pruning, masks and lottery tickets (shared by the papers of issue 17)."""
from .masks import (apply_masks, global_magnitude_masks, layerwise_magnitude_masks, masks_of, random_masks,
                    remove_masks, rewind, sparsity_of)

__all__ = ["apply_masks", "global_magnitude_masks", "layerwise_magnitude_masks", "masks_of", "random_masks",
           "remove_masks", "rewind", "sparsity_of"]
