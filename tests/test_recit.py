"""ReCIT building blocks (arXiv 2504.20570): LoRA gradient formula vs autograd through peft, span filter, metrics."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from reprolab.privacy.recit import (exact_pii_recovery, lora_grads_by_formula, make_records, span_filter_scores,
                                    token_recovery)


class Toy(nn.Module):
    def __init__(self, d_in=12, d_out=10):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def test_lora_gradient_matches_formula_through_peft():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(Toy(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # non-zero B, as after some rounds of tuning
    x = torch.randn(7, 12)  # (N, d_in): the known record's layer inputs
    out = model(x)  # (N, d_out)
    out.retain_grad()
    target = torch.randn(7, 10)
    ((out - target) ** 2).sum().backward()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    dA, dB = lora_grads_by_formula(x, out.grad, A.detach(), B.detach(), scale=8 / 4)
    assert torch.allclose(A.grad, dA, atol=1e-5) and torch.allclose(B.grad, dB, atol=1e-5)
    # the rows of dL/dA lie in the span of the inputs
    scores = span_filter_scores(A.grad, torch.cat([x, torch.randn(3, 12)]))
    assert (scores[:7] > -1).all()  # finite
    Q, _ = torch.linalg.qr(x.T.double())  # (d_in, N) basis of span{x_t}
    g = A.grad.double()
    assert (g - (g @ Q) @ Q.T).norm() < 1e-5 * g.norm()


def test_span_filter_separates_batch_tokens_when_unsaturated():
    torch.manual_seed(1)
    V, d = 300, 64
    X = torch.randn(V, d)
    batch = torch.tensor([3, 17, 42, 99, 250])
    G = torch.randn(12, len(batch)) @ X[batch]  # (12, d): gradient rows are combinations of the batch inputs
    s = span_filter_scores(G, X)
    assert s[batch].max() < 1e-5
    others = torch.ones(V, dtype=torch.bool)
    others[batch] = False
    assert s[others].min() > 0.3
    # saturated span (more distinct inputs than dimensions): every token passes, the filter carries no information
    G_sat = torch.randn(d, d)
    assert span_filter_scores(G_sat, X).max() < 1e-4


def test_recovery_metrics_vs_naive():
    recs = make_records(5, seed=0)
    assert recs == make_records(5, seed=0) and recs != make_records(5, seed=1)
    assert all(len(r["phone"]) == 8 and r["phone"].isdigit() and r["phone"] in r["text"] for r in recs)
    got = [recs[0], dict(recs[1], phone="00000000"), recs[3]]
    naive = sum(any(g["first"] == r["first"] and g["last"] == r["last"] and g["phone"] == r["phone"] for g in got)
                for r in recs) / len(recs)
    assert exact_pii_recovery(got, recs) == pytest.approx(naive) == pytest.approx(0.4)
    m = token_recovery({1, 2, 3, 9}, {1, 2, 3, 4, 5, 6})
    assert m["precision"] == pytest.approx(0.75) and m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.5 / 1.25)
    assert token_recovery(set(), {1})["f1"] == 0.0
