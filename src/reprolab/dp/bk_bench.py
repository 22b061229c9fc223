"""Cost benchmark and private causal-LM fine-tuning for book-keeping DP (https://arxiv.org/abs/2210.00038).

``measure_step`` times one training step (forward, backward, per-sample clipping, sum) of an engine and measures its
peak memory on CPU as the rise of the process's resident-set high-water mark (Linux ``VmHWM`` after resetting it
through ``/proc/self/clear_refs``, following ``gc.collect`` and ``malloc_trim``), next to the engine's analytic
``extra_bytes``. ``train_causal_lm`` runs DP-Adam (Poisson batches, clipping, Gaussian noise) with any engine.
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from typing import Callable

import torch
from torch import nn

from .bk import causal_lm_losses, engine_clipped_sum, opacus_clipped_sum
from .clipping import add_gaussian_noise, sensitivity
from .train import poisson_batches

BENCH_ENGINES = ("nonprivate", "opacus", "instantiate", "ghostclip", "bk")


def small_llama(hidden: int, layers: int, heads: int, intermediate: int, vocab: int = 49152, seed: int = 0,
                max_len: int = 2048) -> nn.Module:
    """A SmolLM2-shaped Llama (tied, frozen embeddings; RMSNorm; SwiGLU MLP) of the given width and depth."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 3), tie_word_embeddings=True,
                      max_position_embeddings=max_len, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).eval()
    freeze_embeddings(model)
    return model


def freeze_embeddings(model: nn.Module) -> int:
    """requires_grad=False on every nn.Embedding (and the LM head tied to it); returns trainable parameter count."""
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            mod.weight.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    return _rss_kb("VmRSS")


def clipped_sum_by(engine: str, model: nn.Module, losses_fn: Callable, **kw):
    """Dispatch to the engine (``opacus`` or one of ``bk.ENGINES``)."""
    if engine == "opacus":
        return opacus_clipped_sum(model, losses_fn, **kw)
    return engine_clipped_sum(model, losses_fn, engine, **kw)


def measure_step(engine: str, model: nn.Module, losses_fn: Callable, reps: int = 3, **kw) -> dict:
    """Median wall time (s) of ``reps`` steps after one warm-up, peak RSS rise (MiB) of one step, extra_bytes."""
    clipped_sum_by(engine, model, losses_fn, **kw)  # warm-up
    rss0 = _reset_peak()
    _, _, stats = clipped_sum_by(engine, model, losses_fn, **kw)
    peak_mib = (_rss_kb("VmHWM") - rss0) / 1024
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        clipped_sum_by(engine, model, losses_fn, **kw)
        times.append(time.perf_counter() - t0)
    return {"time_s": statistics.median(times), "peak_mib": peak_mib, "extra_bytes": stats["extra_bytes"]}


def train_private(model: nn.Module, num_samples: int, losses_at: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                  *, engine: str, steps: int, sample_rate: float, lr: float, sigma: float = 0.0,
                  clipping: str = "abadi", R: float = 1.0, generator: torch.Generator | None = None,
                  progress=lambda it: it) -> list[float]:
    """Adam on Poisson batches (index tensors) of ``num_samples`` examples; ``losses_at(model, idx) -> (B_t,)``.

    Private (clipped sum by ``engine`` + N(0, (sigma S)^2 I)) unless ``engine == 'nonprivate'``; the sum is divided
    by the expected batch q N. Returns the mean batch losses."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam(params.values(), lr=lr)
    expected = sample_rate * num_samples
    history = []
    for idx in progress(list(poisson_batches(num_samples, sample_rate, steps, generator))):
        if len(idx) == 0:
            summed = {n: torch.zeros_like(p) for n, p in params.items()}
        else:
            def losses_fn(m, idx=idx):
                out = losses_at(m, idx)  # (B_t,)
                history.append(out.mean().item())
                return out
            summed, _, _ = clipped_sum_by(engine, model, losses_fn, clipping=clipping, R=R)
        summed = {n: summed[n] for n in params}
        if engine != "nonprivate":
            summed = add_gaussian_noise(summed, sigma * sensitivity(clipping, R), generator)
        for n, p in params.items():
            p.grad = summed[n] / expected
        opt.step()
        opt.zero_grad(set_to_none=True)
    return history


def train_causal_lm(model: nn.Module, chunks: torch.Tensor, **kw) -> list[float]:
    """``train_private`` on (N, T) token chunks with the next-token loss."""
    return train_private(model, len(chunks), lambda m, idx: causal_lm_losses(m, chunks[idx]), **kw)


@torch.no_grad()
def heldout_loss(model: nn.Module, chunks: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token cross-entropy over (N, T) chunks."""
    tot = [causal_lm_losses(model, chunks[i:i + batch]) for i in range(0, len(chunks), batch)]
    return float(torch.cat(tot).mean())


def text_chunks(tok, text: str, seq_len: int, max_chunks: int) -> torch.Tensor:
    """Non-overlapping (N, seq_len) token-id chunks of ``text`` (no special tokens)."""
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]  # (L,)
    n = min(max_chunks, len(ids) // seq_len)
    return ids[: n * seq_len].reshape(n, seq_len)


def training_bytes(model: nn.Module, losses_fn: Callable) -> int:
    """Analytic memory of non-private training: parameters + their gradients + tensors autograd saves for the
    backward (counted once per storage through ``saved_tensors_hooks``)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses_fn(model)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return int(params + grads + sum(seen.values()))


def byte_chunks(text: str, seq_len: int, max_chunks: int) -> torch.Tensor:
    """Byte-level (vocab 256) non-overlapping (N, seq_len) chunks of ``text``."""
    ids = torch.tensor(list(text.encode("utf-8")[: max_chunks * seq_len]), dtype=torch.long)
    n = len(ids) // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)
