"""Quantization: INT8 absmax fake quant (W8A8), SmoothQuant smoothing, real INT8 linear layers (torch.ao).

Paper: Xiao et al. 2022, "SmoothQuant" (https://arxiv.org/abs/2211.10438): ``fake_quant.py``, ``smoothquant.py``,
``int8_bench.py``.
"""
from .fake_quant import (ACT_QUANTS, WEIGHT_QUANTS, W8A8Linear, decoder_linears, quantize_activation_per_tensor_absmax,
                         quantize_activation_per_token_absmax, quantize_model, quantize_weight_per_channel_absmax,
                         quantize_weight_per_tensor_absmax)
from .int8_bench import (bench_int_mm_cuda, bench_linears_cpu, linear_shapes, quantize_dynamic_model, to_dynamic_int8,
                         total_speedup, weight_memory)
from .smoothquant import (collect_act_stats, draw_slice, draw_windows, inject_outliers, norm_linear_pairs, outlier_ratio,
                          smooth_ln_fcs, smooth_lm, smoothing_factors, w8a8_copy)
