"""Differential privacy engine: per-sample gradients, per-sample clipping (Abadi, AUTO-S), Gaussian noise,
Poisson subsampling and accounting (opacus RDP/PRV), DP-SGD / DP-Adam training.

Papers: Abadi et al. 2016 (https://arxiv.org/abs/1607.00133); Bu et al. 2022, "Automatic Clipping"
(https://arxiv.org/abs/2206.07136, ``autoclip.py``); Bu et al. 2022, book-keeping (https://arxiv.org/abs/2210.00038,
``bk.py``: per-sample norms for Linear / Embedding / LayerNorm / RMSNorm / bias layers of transformers by
instantiation, ghost norm or the mixed rule; GhostClip and BK clipped sums; opacus and naive references;
``bk_bench.py``: cost measurement and private training); Bu et al. 2022, DP-BiTFiT (https://arxiv.org/abs/2210.00036,
``bitfit.py``).
"""
from .accountant import ACCOUNTANTS, epsilon_spent, noise_multiplier
from .clipping import (AUTO_S_GAMMA, CLIPPING_STYLES, add_gaussian_noise, clip_and_sum, clip_factor_abadi,
                       clip_factor_auto_s, clip_factors, sensitivity)
from .per_sample import per_sample_grads, per_sample_norms, trainable_params
from .ghost import ghost_clip_and_sum, ghost_forward_backward, ghost_norms
from .train import (PER_SAMPLE_METHODS, DPConfig, accuracy, clipped_sum, dp_step, make_optimizer, poisson_batches,
                    private_grad, train_dp)

__all__ = [
    "ACCOUNTANTS", "AUTO_S_GAMMA", "CLIPPING_STYLES", "PER_SAMPLE_METHODS", "DPConfig", "accuracy",
    "add_gaussian_noise", "clip_and_sum", "clipped_sum", "ghost_clip_and_sum", "ghost_forward_backward", "ghost_norms",
    "clip_factor_abadi", "clip_factor_auto_s", "clip_factors", "dp_step", "epsilon_spent", "make_optimizer",
    "noise_multiplier", "per_sample_grads", "per_sample_norms", "poisson_batches", "private_grad", "sensitivity",
    "trainable_params", "train_dp",
]
