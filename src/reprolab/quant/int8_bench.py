"""Real INT8 linear layers (torch.ao / fbgemm on CPU, ``torch._int_mm`` on CUDA) against float, for SmoothQuant.

SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models (Xiao et al., 2022),
https://arxiv.org/abs/2211.10438. The paper reports up to 1.56x speedup and 2x memory reduction of W8A8 over FP16
(CUTLASS INT8 GEMMs in PyTorch / FasterTransformer, GPUs). Here, on CPU, a W8A8 linear is torch.ao's dynamic
quantized ``Linear`` (per-channel symmetric INT8 weights, per-tensor dynamic activations, fbgemm kernels; fbgemm
quantizes the activations with ``reduce_range=True``, i.e. 7-bit unsigned affine, to avoid overflow in its kernels),
timed against fp32 ``nn.Linear`` on the model's layer shapes. Wall-clock numbers are benchmarks, never metrics.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def linear_shapes(config) -> list[tuple[str, int, int, int]]:
    """(name, in_features, out_features, count per decoder layer) of a Llama-like or OPT config's linears."""
    h = config.hidden_size
    heads = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or h // heads
    if getattr(config, "model_type", "") == "opt":
        ffn = config.ffn_dim
        return [("qkv/out_proj", h, h, 4), ("fc1", h, ffn, 1), ("fc2", ffn, h, 1)]
    kv = getattr(config, "num_key_value_heads", heads) or heads
    inter = config.intermediate_size
    shapes = [("q_proj", h, heads * hd, 1), ("k/v_proj", h, kv * hd, 2), ("o_proj", heads * hd, h, 1),
              ("gate/up_proj", h, inter, 2), ("down_proj", inter, h, 1)]
    return [s for s in shapes if s[3] > 0]


def to_dynamic_int8(linear: nn.Linear) -> nn.Module:
    """torch.ao dynamic INT8 copy of ``linear``: per-channel symmetric qint8 weights, dynamic per-tensor activations."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    wrapped = nn.Sequential(linear)
    return quantize_dynamic(wrapped, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=False)[0]


@torch.no_grad()
def quantize_dynamic_model(model: nn.Module) -> nn.Module:
    """Replace every decoder linear of a Llama-like/OPT model by torch.ao's dynamic INT8 Linear (in place)."""
    from .fake_quant import decoder_linears

    for parent, attr, _ in decoder_linears(model).values():
        setattr(parent, attr, to_dynamic_int8(getattr(parent, attr)))
    return model


def int8_weight_bytes(qlinear: nn.Module) -> int:
    """Bytes of a torch.ao quantized linear's weight as stored: INT8 codes + per-channel scales + zero points."""
    w = qlinear.weight()
    n = w.int_repr().numel() * w.int_repr().element_size()
    if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        n += w.q_per_channel_scales().numel() * w.q_per_channel_scales().element_size()
        n += w.q_per_channel_zero_points().numel() * w.q_per_channel_zero_points().element_size()
    else:
        n += 8 + 8  # one float64 scale and one int64 zero point
    return n


def weight_memory(shapes: list[tuple[str, int, int, int]], n_layers: int, seed: int = 0) -> dict:
    """Weight bytes of all decoder linears in FP16 (2 bytes a weight) vs torch.ao INT8 (codes + scales + zero points).

    Deterministic (depends on shapes only). Returns ``{"fp16_bytes", "int8_bytes", "ratio"}``.
    """
    g = torch.Generator().manual_seed(seed)
    fp16 = int8 = 0
    for _, fin, fout, count in shapes:
        lin = nn.Linear(fin, fout, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(fout, fin, generator=g) * 0.02)
        fp16 += count * n_layers * fin * fout * 2
        int8 += count * n_layers * int8_weight_bytes(to_dynamic_int8(lin))
    return {"fp16_bytes": fp16, "int8_bytes": int8, "ratio": fp16 / int8}


def median_seconds(fn, x: torch.Tensor, reps: int, warmup: int = 3) -> float:
    """Median wall-clock seconds of ``fn(x)`` over ``reps`` calls after ``warmup`` calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_linears_cpu(shapes: list[tuple[str, int, int, int]], tokens: int, reps: int, seed: int = 0) -> list[dict]:
    """Median time of fp32 ``nn.Linear`` vs torch.ao dynamic INT8 ``Linear`` for each shape on ``tokens`` rows.

    Returns one dict per shape: name, in, out, count, fp32_s, int8_s, speedup (= fp32_s / int8_s).
    """
    torch.backends.quantized.engine = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "qnnpack"
    g = torch.Generator().manual_seed(seed)
    rows = []
    for name, fin, fout, count in shapes:
        lin = nn.Linear(fin, fout, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(fout, fin, generator=g) * 0.02)
        qlin = to_dynamic_int8(lin)
        x = torch.randn(tokens, fin, generator=g)  # (T, in)
        t32, t8 = median_seconds(lin, x, reps), median_seconds(qlin, x, reps)
        rows.append({"name": name, "in": fin, "out": fout, "count": count, "fp32_s": t32, "int8_s": t8,
                     "speedup": t32 / t8})
    return rows


def bench_int_mm_cuda(shapes: list[tuple[str, int, int, int]], tokens: int, reps: int = 50) -> list[dict]:
    """On CUDA: ``torch._int_mm`` (INT8 x INT8 -> INT32) vs an FP16 matmul, per shape (the paper's GPU setting).

    Times the GEMM only (no quantize/dequantize), with CUDA events; returns rows like :func:`bench_linears_cpu`.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("bench_int_mm_cuda needs a CUDA device")
    dev = torch.device("cuda")
    rows = []
    for name, fin, fout, count in shapes:
        a16 = torch.randn(tokens, fin, device=dev, dtype=torch.float16)  # (T, in)
        w16 = torch.randn(fin, fout, device=dev, dtype=torch.float16)  # (in, out)
        a8 = torch.randint(-127, 128, (tokens, fin), device=dev, dtype=torch.int8)
        w8 = torch.randint(-127, 128, (fout, fin), device=dev, dtype=torch.int8).t()  # (in, out), column-major

        def cuda_time(fn):
            for _ in range(10):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / reps

        t16 = cuda_time(lambda: a16 @ w16)
        t8 = cuda_time(lambda: torch._int_mm(a8, w8))
        rows.append({"name": name, "in": fin, "out": fout, "count": count, "fp16_s": t16, "int8_s": t8,
                     "speedup": t16 / t8})
    return rows


def total_speedup(rows: list[dict], base: str = "fp32_s") -> float:
    """Speedup of one decoder layer's linears: sum(count * base time) / sum(count * int8 time)."""
    return sum(r["count"] * r[base] for r in rows) / sum(r["count"] * r["int8_s"] for r in rows)
