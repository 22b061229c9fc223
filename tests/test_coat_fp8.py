"""COAT (arXiv 2410.19313): E4M3 against a bit-level reference, Dynamic Range Expansion, the FP8 AdamW step against
AdamW with fake-quantized states, exact byte accounting, and FP8 activations."""
import copy
import math

import pytest
import torch
from torch import nn

from reprolab.memory.coat_fp8 import (FP8AdamW, FP8Linear, apply_coat_activations, fake_quantized_state,
                                      fp8_state_bytes, lm_loss, relative_errors, tiny_llama)
from reprolab.memory.meter import SavedTensorMeter, optimizer_state_bytes
from reprolab.quant.fp8 import (DRE_RANGE, E4M3, dequantize_dre, e4m3_grid, expansion_exponent, fake_quantize,
                                quantize_dre, quantize_per_group, to_e4m3)


def decode_e4m3(code: int) -> float:
    """E4M3 (fn) by the book: 1 sign, 4 exponent bits (bias 7), 3 mantissa bits, S.1111.111 is NaN, no infinity."""
    s, e, m = code >> 7, (code >> 3) & 0xF, code & 0x7
    if e == 0xF and m == 0x7:
        return math.nan
    mag = (m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    return -mag if s else mag


POS = [(decode_e4m3(c), c) for c in range(0x7F)]  # codes 0..126: all finite non-negative values, increasing


def round_e4m3_naive(x: float) -> float:
    """Nearest finite E4M3 value, ties to the even code (mantissa LSB 0), saturating at 448."""
    a = min(abs(x), 448.0)
    best = min(POS, key=lambda vc: (abs(vc[0] - a), vc[1] & 1))
    return math.copysign(best[0], x) if best[0] else 0.0


def test_every_code_decodes_like_the_reference():
    torch_vals = torch.arange(256, dtype=torch.uint8).view(E4M3).float().tolist()
    for code, val in enumerate(torch_vals):
        ref = decode_e4m3(code)
        assert (math.isnan(ref) and math.isnan(val)) or ref == val, code
    grid = e4m3_grid()
    assert len(grid) == 253 and grid.max() == 448 and grid[grid > 0].min() == 2.0 ** -9


def test_rounding_matches_the_reference_including_ties():
    gen = torch.Generator().manual_seed(0)
    vals = [v for v, _ in POS]
    mids = [(a + b) / 2 for a, b in zip(vals[:-1], vals[1:])]  # exact ties
    rand = (torch.randn(3000, generator=gen) * torch.exp(4 * torch.randn(3000, generator=gen))).tolist()
    xs = torch.tensor(mids + [-m for m in mids] + rand + [500.0, -1e6, 1e-12], dtype=torch.float32)
    got = to_e4m3(xs).float().tolist()
    want = [round_e4m3_naive(float(x)) for x in xs]
    assert got == want
    # representable values survive the round trip exactly; in the normal range the error is <= 2^-4 relative
    assert torch.equal(to_e4m3(e4m3_grid()).float(), e4m3_grid())
    normal = xs[(xs.abs() >= 2.0 ** -6) & (xs.abs() <= 448)]
    rel = ((to_e4m3(normal).float() - normal) / normal).abs()
    assert rel.max() <= 2.0 ** -4


def test_dre_exponent_is_the_largest_that_fits():
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        lo, span = float(torch.rand(1, generator=gen) * -20), float(torch.rand(1, generator=gen) * 25 + 0.1)
        absmin, absmax = torch.tensor([10.0 ** lo]), torch.tensor([10.0 ** (lo + span)])
        k = float(expansion_exponent(absmax, absmin, 16))
        ratio = 10.0 ** span
        assert k * 16 == round(k * 16)
        assert ratio ** k <= DRE_RANGE * (1 + 1e-9) or k == 1 / 16
        assert ratio ** (k + 1 / 16) > DRE_RANGE or k == 64


def test_dre_reduces_relative_error_on_a_skewed_group():
    gen = torch.Generator().manual_seed(2)
    # a second-moment-like group: squared gradients spanning ~7 orders of magnitude, wider than E4M3's range
    v = (torch.randn(4, 128, generator=gen) * torch.exp(2 * torch.randn(4, 128, generator=gen))).pow(2) * 1e-6
    plain = relative_errors(v, fake_quantize(v, "group", 128))
    dre = relative_errors(v, fake_quantize(v, "dre", 128))
    assert plain["flushed_to_zero"] > 0.05 and dre["flushed_to_zero"] == 0
    assert dre["relative_mse"] < plain["relative_mse"] / 10
    # a narrow group gets k > 1 and a smaller error than plain per-group scaling
    narrow = 1 + 0.5 * torch.rand(128, generator=gen)
    st = quantize_dre(narrow, 128)
    assert st["k"].item() > 1
    back = dequantize_dre(st, narrow.shape, 128)
    assert (back - narrow).abs().max() < (fake_quantize(narrow, "group", 128) - narrow).abs().max()
    # signed first moments keep their sign, zeros stay zero, and a ragged tail group is handled
    m = torch.randn(300, generator=gen) * torch.exp(2 * torch.randn(300, generator=gen))
    m[::7] = 0
    back = fake_quantize(m, "dre", 128)
    assert torch.equal(torch.sign(back), torch.sign(m))


def test_dre_group_minimum_skips_zeros():
    """As the official kernel (fp8_adamw_expand_cuda_kernel.cu: 'Skip zero values when computing minimum'): a zero in a
    group leaves its exponent k and the other elements' round trip unchanged, and decodes to exactly 0."""
    gen = torch.Generator().manual_seed(4)
    v = (torch.randn(2, 128, generator=gen) * torch.exp(torch.randn(2, 128, generator=gen))).pow(2) * 1e-6
    v[0, 0], v[1, 0] = v[0].max() * 2, v[1].max() * 2  # fix each group's max away from the element zeroed below
    v[0, 1], v[1, 1] = v[0].min() / 2, v[1].min() / 2  # and its non-zero min
    z = v.clone()
    z[0, 5] = 0.0
    a, b = quantize_dre(v, 128), quantize_dre(z, 128)
    assert torch.equal(a["k"], b["k"]) and torch.equal(a["scale"], b["scale"])
    back_v, back_z = dequantize_dre(a, v.shape, 128), dequantize_dre(b, z.shape, 128)
    keep = torch.ones_like(v, dtype=torch.bool)
    keep[0, 5] = False
    assert torch.equal(back_v[keep], back_z[keep]) and back_z[0, 5] == 0
    # without the skip one zero would set min to ~0 and k to 1/16; with it the relative error stays small
    assert relative_errors(z, back_z)["relative_mse"] < 0.01
    # an all-zero group round-trips to zeros
    assert torch.equal(fake_quantize(torch.zeros(256), "dre", 128), torch.zeros(256))


def naive_dre_group_params(values: list[float], expand_min: int = 16, skip_zeros: bool = True):
    """One group's DRE parameters by a plain loop, transcribing the official kernel
    (NVlabs/COAT coat/optimizer/kernels/fp8_adamw_expand_cuda_kernel.cu @ 80ec99f): max |x| and min |x| over the group
    with zero values skipped in the min-reductions (:95-101, :130-136), + QUANT_MIN_VAL 1e-30 (:15, :154-157), the
    exponent floor(log2(448^2 / 2) / log2(max / min) * expand_min) / expand_min (:170-172), the centre
    sqrt(max) sqrt(min) (:164-165) and the scale (max / centre)^k / 448 (:180-181)."""
    mx, mn = 0.0, math.inf
    for v in values:
        a = abs(v)
        mx = max(mx, a)
        if a > 0 or not skip_zeros:
            mn = min(mn, a)
    mx, mn = mx + 1e-30, mn + 1e-30
    k = math.floor(math.log2(448.0 * 448.0 / 2) / math.log2(mx / mn) * expand_min) / expand_min
    centre = math.sqrt(mx) * math.sqrt(mn)
    return {"k": k, "sqrt_minmax": centre, "scale": (mx / centre) ** k / 448.0, "min": mn}


def test_dre_group_minimum_matches_the_naive_zero_skipping_reference():
    """quantize_dre's per-group k, centre and scale equal the plain-loop transcription of the official kernel, on groups
    with zeros in them (where a minimum that includes zeros, the earlier version, gives k <= 1/8), and a ragged tail."""
    gen = torch.Generator().manual_seed(11)
    n, g = 5 * 128 + 37, 128
    v = (torch.randn(n, generator=gen) * torch.exp(2 * torch.randn(n, generator=gen))).pow(2) * 1e-5  # v-like, > 0
    zero = torch.rand(n, generator=gen) < 0.1  # ~10% exact zeros, in every group
    v[zero] = 0.0
    m = torch.randn(n, generator=gen) * 1e-3  # signed (first moment), with zeros too
    m[zero] = 0.0
    for x in (v, m):
        st = quantize_dre(x, g, 16)
        for gi in range(math.ceil(n / g)):
            group = x[gi * g:(gi + 1) * g].double().tolist()
            assert any(val == 0.0 for val in group)
            ref = naive_dre_group_params(group)
            assert st["k"][gi].item() == ref["k"]
            assert st["sqrt_minmax"][gi].item() == pytest.approx(ref["sqrt_minmax"], rel=1e-6)
            assert st["scale"][gi].item() == pytest.approx(ref["scale"], rel=1e-5)
            # skipping zeros matters: with them the minimum is 1e-30 and k falls to 1/16 or 1/8
            assert naive_dre_group_params(group, skip_zeros=False)["k"] <= 1.0 / 8 < ref["k"]
    # the naive round trip with the reference's parameters: |x| = (q * scale)^(1/k) * centre, q the E4M3 code of
    # (|x| / centre)^k / scale, matches dequantize_dre element by element
    back = dequantize_dre(quantize_dre(v, g, 16), v.shape, g)
    for i in range(0, n, 7):
        ref = naive_dre_group_params(v[(i // g) * g:(i // g + 1) * g].double().tolist())
        y = (v[i].item() / ref["sqrt_minmax"]) ** ref["k"] / ref["scale"]
        want = (round_e4m3_naive(y) * ref["scale"]) ** (1 / ref["k"]) * ref["sqrt_minmax"] if y else 0.0
        assert back[i].item() == pytest.approx(want, rel=1e-4, abs=1e-30)


def quadratic_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(64, 20, generator=gen)
    b = torch.randn(64, generator=gen)
    model = nn.Sequential(nn.Linear(20, 300), nn.Tanh(), nn.Linear(300, 1))
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    return model, lambda m: (m(A).squeeze(-1) - b).pow(2).mean()


@pytest.mark.parametrize("expansion", [True, False])
def test_fp8_adamw_matches_adamw_with_fake_quantized_states(expansion):
    model, loss_fn = quadratic_problem()
    ref = copy.deepcopy(model)
    opt = FP8AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, expansion=expansion)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(8):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            loss_fn(m).backward()
            o.step()
        for st in ref_opt.state.values():
            fake_quantized_state(st, 128, expansion)
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.allclose(p, q, atol=1e-6, rtol=1e-5)


def test_fp8_adamw_tracks_fp32_adamw():
    model, loss_fn = quadratic_problem(1)
    fp32 = copy.deepcopy(model)
    opts = {"dre": FP8AdamW(model.parameters(), lr=3e-3), "fp32": torch.optim.AdamW(fp32.parameters(), lr=3e-3)}
    start = float(loss_fn(model))
    for _ in range(60):
        for m, o in ((model, opts["dre"]), (fp32, opts["fp32"])):
            o.zero_grad()
            loss_fn(m).backward()
            o.step()
    l8, l32 = float(loss_fn(model)), float(loss_fn(fp32))
    assert l32 < 0.5 * start
    assert abs(l8 - l32) <= 0.05 * (start - l32)


def test_optimizer_state_bytes_are_exact():
    model, loss_fn = quadratic_problem()
    shapes = [p.numel() for p in model.parameters()]
    for expansion in (True, False):
        opt = FP8AdamW(model.parameters(), expansion=expansion)
        loss_fn(model).backward()
        opt.step()
        assert optimizer_state_bytes(opt) == sum(fp8_state_bytes(n, 128, expansion) for n in shapes)
        # by hand for the 300 x 20 weight: 6000 E4M3 + 47 groups x (scale, k, sqrt_minmax) float32, twice, + step
        assert fp8_state_bytes(6000, 128, True) == 2 * (6000 + 47 * 12) + 4
        st = opt.state[model[0].weight]
        assert st["exp_avg_q"].dtype == E4M3 and st["exp_avg_q"].numel() == 6000
    adam = torch.optim.AdamW(model.parameters())
    adam.step()
    assert optimizer_state_bytes(adam) == sum(8 * n + 4 for n in shapes)


def test_fp8_linear_gradients_and_saved_bytes():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    fp8 = FP8Linear.from_linear(copy.deepcopy(lin))
    x = torch.randn(4, 8, 32)
    gy = torch.randn(4, 8, 16)
    with SavedTensorMeter(fp8) as meter:
        out = fp8(x)
    assert meter.bytes_by_dtype() == {"float8_e4m3fn": 4 * 8 * 32, "float32": 4}  # E4M3 input + its scale
    (out * gy).sum().backward()
    # reference: the same computation with fake-quantized input and weight, through autograd
    w = lin.weight.detach().requires_grad_()
    y = torch.nn.functional.linear(fake_quantize(x, "tensor"), fake_quantize(w, "tensor").detach() + w
                                   - w.detach(), lin.bias)
    assert torch.allclose(out, y, atol=1e-6)
    (y * gy).sum().backward()
    assert torch.allclose(fp8.weight.grad, w.grad, atol=1e-5)


def test_quantizers_work_under_deterministic_algorithms():
    """Notebooks call torch.use_deterministic_algorithms(True), whose NaN pre-fill torch 2.2 lacks for float8."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        x = torch.randn(300)
        for mode in ("tensor", "group", "dre"):
            assert torch.isfinite(fake_quantize(x, mode, 128)).all()
    finally:
        torch.use_deterministic_algorithms(before)


def test_coat_llama_stores_fp8_activations_once():
    model = tiny_llama(vocab_size=20, hidden=32, layers=1, heads=2, intermediate=64, max_len=16, seed=0)
    coat = copy.deepcopy(model)
    assert apply_coat_activations(coat, 16) == 7
    x = torch.randint(0, 20, (2, 17))
    assert float(lm_loss(coat, x)) == pytest.approx(float(lm_loss(model, x)), rel=0.02)
    with SavedTensorMeter(coat) as meter:
        loss = lm_loss(coat, x)
    kinds = {r.kind for r in meter.records if r.dtype == "float8_e4m3fn"}
    assert kinds == {"FP8Linear", "FP8RMSNorm", "LlamaMLP"}
    T, d, f = 16, 32, 64
    # q/k/v share one E4M3 copy of the normed input, gate/up another; o_proj and down_proj have their own
    fp8_linear = meter.bytes_where(lambda r: r.kind == "FP8Linear" and r.dtype == "float8_e4m3fn")
    assert fp8_linear == 2 * T * (d + d + d + f)
    loss.backward()
    assert all(p.grad is not None for p in coat.parameters())
    q, _ = quantize_per_group(torch.randn(50), 16)
    assert q.numel() == 50
