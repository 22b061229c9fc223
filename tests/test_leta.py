"""LETA (arXiv 2312.15359): deletion/insertion AUC, the rule-based attribution, masks and the explainer's outputs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as Fn

from reprolab.data import MOBILENET_V2_WEIGHTS
from reprolab.explain.leta import (Encoder, GenericExplainer, integrated_gradients_attribution, leta_attribution,
                                   load_mobilenet_v2, minmax, neighbourhood_masks, rise_embeddings, rise_from_scores,
                                   rise_masks, saliency_attribution, train_explainer)
from reprolab.explain.metrics import auc, deletion_insertion_curves, patch_order
from reprolab.paths import MODELS_DIR


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mobilenet():
    return load_mobilenet_v2(MODELS_DIR / MOBILENET_V2_WEIGHTS)


def _naive_curves(score, x, attr, grid, steps):
    """Deletion/insertion by an explicit loop over images and steps (pixels zeroed patch by patch)."""
    B, C, H, W = x.shape
    ph, pw = H // grid, W // grid
    dels, inss = [], []
    for b in range(B):
        flat = attr[b].flatten().tolist()
        order = sorted(range(grid * grid), key=lambda p: (-flat[p], p))
        d_curve, i_curve = [], []
        for t in range(steps + 1):
            k = int(np.round(t * grid * grid / steps))
            xd, xi = x[b].clone(), torch.zeros_like(x[b])
            for p in order[:k]:
                r, c = divmod(p, grid)
                xd[:, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = 0
                xi[:, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = x[b][:, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw]
            d_curve.append(float(score(xd[None], torch.tensor([b]))[0]))
            i_curve.append(float(score(xi[None], torch.tensor([b]))[0]))
        dels.append(d_curve)
        inss.append(i_curve)
    return torch.tensor(dels), torch.tensor(inss)


def _naive_auc(ys):
    area = 0.0
    for k in range(len(ys) - 1):
        area += 0.5 * (ys[k] + ys[k + 1]) * (1.0 / (len(ys) - 1))
    return area


def test_deletion_insertion_auc_match_naive_loop():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 12, 12)
    attr = torch.rand(3, 4, 4)
    attr[0, 0, :2] = 0.5  # a tie, broken by patch index in both implementations
    w = torch.randn(3, 12, 12)
    score = lambda imgs, idx: torch.sigmoid((imgs.sum(1) * w[idx]).sum((1, 2)) / 10)  # noqa: E731
    d, i = deletion_insertion_curves(score, x, patch_order(attr), grid=4, steps=4, batch=5)
    dn, inn = _naive_curves(score, x, attr, grid=4, steps=4)
    torch.testing.assert_close(d, dn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(i, inn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(auc(d), torch.tensor([_naive_auc(r) for r in dn.tolist()]), rtol=1e-5, atol=1e-6)
    # endpoints: nothing deleted = full image, everything deleted = black image; insertion the reverse
    torch.testing.assert_close(d[:, 0], score(x, torch.arange(3)))
    torch.testing.assert_close(i[:, -1], score(x, torch.arange(3)))
    torch.testing.assert_close(d[:, -1], score(torch.zeros_like(x), torch.arange(3)))


def test_auc_of_known_curves():
    assert float(auc(torch.tensor([[1.0, 1.0, 1.0]]))) == pytest.approx(1.0)
    assert float(auc(torch.tensor([[0.0, 0.5, 1.0]]))) == pytest.approx(0.5)
    assert float(auc(torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]]))) == pytest.approx(0.125)


def test_leta_rule_for_linear_head_is_closed_form():
    torch.manual_seed(1)
    B, g, d, K = 2, 3, 5, 4
    pos, neg = torch.randn(B, g * g, d), torch.randn(B, g * g, d)
    W, b = torch.randn(K, d), torch.randn(K)
    cls = torch.tensor([2, 0])
    lp, ln = 1.0, 0.7
    a = leta_attribution(pos, neg, W, b, cls, g, r=0, lambda_pos=lp, lambda_neg=ln, pool=False)
    for i in range(B):
        raw = torch.tensor([lp * (W[cls[i]] @ pos[i, p] + b[cls[i]]) - ln * (W[cls[i]] @ neg[i, p] + b[cls[i]])
                            for p in range(g * g)]).view(g, g)
        torch.testing.assert_close(a[i], (raw - raw.min()) / (raw.max() - raw.min()))
    # lambda_pos = lambda_neg: the bias cancels, so the map equals the head applied to phi+ - phi- without bias
    a1 = leta_attribution(pos, neg, W, b, cls, g, pool=False)
    a0 = leta_attribution(pos - neg, torch.zeros_like(neg), W, torch.zeros(K), cls, g, pool=False)
    torch.testing.assert_close(a1, a0)
    # pooling with r = 1 is the (3x3, border-clipped) neighbourhood mean before normalisation
    ap = leta_attribution(pos, neg, W, b, cls, g, r=1, lambda_pos=lp, lambda_neg=ln, pool=True)
    raw = (lp * (pos @ W[cls[0]] + b[cls[0]]) - ln * (neg @ W[cls[0]] + b[cls[0]]))[0].view(g, g)
    man = torch.stack([torch.stack([raw[max(0, r - 1):r + 2, max(0, c - 1):c + 2].mean() for c in range(g)]) for r in range(g)])
    torch.testing.assert_close(ap[0], minmax(man[None])[0])


def test_neighbourhood_masks_by_hand():
    m = neighbourhood_masks(torch.tensor([0, 7, 15]), grid=4, r=1)
    assert m.shape == (3, 4, 4)
    assert m[0].sum() == 4 and m[0, :2, :2].all()  # corner: clipped to 2x2
    assert m[1].sum() == 6 and m[1, 0:3, 2:4].all()  # patch (1, 3) on the right edge: 3x2
    assert m[2].sum() == 4 and m[2, 2:, 2:].all()
    assert neighbourhood_masks(torch.tensor([5]), grid=4, r=0)[0].sum() == 1


def test_explainer_shapes_training_and_normalisation(mobilenet):
    torch.manual_seed(0)
    grid, dim = 6, 16
    ex = GenericExplainer(mobilenet, grid, dim, stem_blocks=7, width=16)
    x = torch.rand(5, 3, 48, 48)
    pos, neg = ex(x)
    assert pos.shape == neg.shape == (5, grid * grid, dim)
    h = ex.stem_features(x)
    c = torch.tensor([0, 5, 17, 35, 20])
    pc, nc = ex.forward_at(h, c)
    torch.testing.assert_close(pc, pos[torch.arange(5), c], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nc, neg[torch.arange(5), c], rtol=1e-5, atol=1e-6)
    frozen = [p.clone() for p in ex.stem.parameters()]
    tp, tn = torch.randn(5, dim), torch.randn(5, dim)
    losses = train_explainer(ex, h, c, tp, tn, epochs=40, lr=1e-2, batch=5, seed=0)
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(a, b) for a, b in zip(frozen, ex.stem.parameters())), "the stem stays frozen"
    a = leta_attribution(*ex(x), torch.randn(3, dim), torch.randn(3), torch.tensor([0, 1, 2, 0, 1]), grid, r=1)
    assert a.shape == (5, grid, grid) and torch.allclose(a.amin((1, 2)), torch.zeros(5))
    assert torch.allclose(a.amax((1, 2)), torch.ones(5))


def test_saliency_is_patch_sum_of_input_gradient(mobilenet):
    torch.manual_seed(0)
    enc = Encoder(mobilenet)
    x = torch.rand(2, 3, 32, 32)
    W, b = torch.randn(3, 1280) * 0.01, torch.zeros(3)
    cls = torch.tensor([1, 2])
    s = saliency_attribution(enc, W, b, x, cls, grid=4)
    i = 0
    xi = x[i:i + 1].clone().requires_grad_(True)
    (enc(xi) @ W[cls[i]]).sum().backward()
    g = xi.grad.abs().sum(1)[0]
    man = torch.stack([torch.stack([g[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].mean() for c in range(4)]) for r in range(4)])
    torch.testing.assert_close(s[i], minmax(man[None])[0], rtol=1e-4, atol=1e-5)


def test_encoder_is_mobilenet_penultimate(mobilenet):
    enc = Encoder(mobilenet)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        z = enc(x)
        xn = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        logits = mobilenet(xn)
    torch.testing.assert_close(mobilenet.classifier(z), logits, rtol=1e-4, atol=1e-4)


def test_integrated_gradients_completeness_and_patch_sums(mobilenet):
    """Completeness (an independent identity): the pixel attributions sum to logit(x) - logit(black); and the patch
    map is the min-max of the patch sums of those pixel attributions."""
    torch.manual_seed(0)
    enc = Encoder(mobilenet)
    x = torch.rand(2, 3, 32, 32)
    W, b = torch.randn(3, 1280) * 0.05, torch.randn(3)
    cls = torch.tensor([0, 2])
    a, ig = integrated_gradients_attribution(enc, W, b, x, cls, grid=4, steps=64, return_raw=True)
    with torch.no_grad():
        gap = ((enc(x) @ W.T + b) - (enc(torch.zeros_like(x)) @ W.T + b)).gather(1, cls[:, None])[:, 0]
    np.testing.assert_allclose(ig.sum((1, 2, 3)).numpy(), gap.numpy(), rtol=0.05, atol=0.02)
    sums = torch.stack([torch.stack([ig[i, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8].sum() for r in range(4) for c in range(4)])
                        for i in range(2)]).view(2, 4, 4)
    torch.testing.assert_close(a, minmax(sums), rtol=1e-4, atol=1e-5)


class _LinearEncoder(torch.nn.Module):
    """A linear 'encoder' z = A vec(x): every attribution below has a closed form for it."""

    def __init__(self, C, H, W, d, seed=0):
        super().__init__()
        self.A = torch.randn(d, C * H * W, generator=torch.Generator().manual_seed(seed))

    def forward(self, x):
        return x.flatten(1) @ self.A.T


def test_integrated_gradients_closed_form_for_a_linear_model():
    """For a linear logit (W A vec(x) + b), IG from the black image is exactly x * (A^T w_c) (Sundararajan et al.,
    eq. 1 with a constant gradient), for any number of steps; patch scores are its signed patch sums, min-max."""
    torch.manual_seed(0)
    enc = _LinearEncoder(3, 8, 8, 5)
    W, b = torch.randn(4, 5), torch.randn(4)
    x = torch.rand(3, 3, 8, 8)
    cls = torch.tensor([0, 2, 3])
    a, ig = integrated_gradients_attribution(enc, W, b, x, cls, grid=2, steps=3, return_raw=True)
    exact = x * (W[cls] @ enc.A).view(3, 3, 8, 8)
    assert torch.allclose(ig, exact, atol=1e-5)
    patch = exact.sum(1).view(3, 2, 4, 2, 4).sum((2, 4))  # (B, 2, 2) signed sums per 4x4 patch
    assert torch.allclose(a, minmax(patch), atol=1e-5)


def test_rise_is_the_conditional_expectation_over_all_masks():
    """RISE with the 2^P masks enumerated and p_keep = 1/2: S_p = E[f | patch p kept]; for an additive score
    f(M) = sum_q w_q M_q that is w_p + (1/2) sum_{q != p} w_q exactly."""
    grid, P = 2, 4
    masks = torch.tensor([[(m >> q) & 1 for q in range(P)] for m in range(2 ** P)], dtype=torch.float32)
    masks = masks.view(-1, grid, grid)
    w = torch.tensor([[0.3, -1.0, 2.0, 0.5], [1.0, 1.0, 0.0, -0.2]])  # two images
    scores = masks.flatten(1) @ w.T  # (N, B)
    _, raw = rise_from_scores(scores.T, masks, 0.5, return_raw=True)
    exact = w + 0.5 * (w.sum(1, keepdim=True) - w)
    assert torch.allclose(raw.flatten(1), exact, atol=1e-6)
    m = rise_masks(2000, 3, 0.3, torch.Generator().manual_seed(0))
    assert set(m.unique().tolist()) == {0.0, 1.0} and abs(float(m.mean()) - 0.3) < 0.02


def test_rise_embeddings_are_the_masked_images_embeddings():
    enc = _LinearEncoder(3, 8, 8, 5, seed=1)
    x = torch.rand(2, 3, 8, 8)
    masks = rise_masks(3, 2, 0.5, torch.Generator().manual_seed(0))
    Z = rise_embeddings(enc, x, masks, batch=4)
    for bi in range(2):
        for n in range(3):
            up = masks[n].repeat_interleave(4, 0).repeat_interleave(4, 1)  # (8, 8)
            assert torch.allclose(Z[bi, n], enc(x[bi:bi + 1] * up)[0], atol=1e-5)


def test_shared_evaluate_equals_per_method_curves():
    """leta_exp.evaluate (each distinct masked image embedded once) gives the curves of
    metrics.deletion_insertion_curves run method by method."""
    from reprolab.explain.leta_exp import evaluate
    torch.manual_seed(0)
    enc = _LinearEncoder(3, 12, 12, 6, seed=2)
    heads = {"a": (torch.randn(3, 6), torch.randn(3)), "b": (torch.randn(2, 6), torch.randn(2))}
    x = torch.rand(4, 3, 12, 12)
    cls = {"a": torch.tensor([0, 1, 2, 0]), "b": torch.tensor([1, 0, 1, 1])}
    rnd = torch.rand(4, 3, 3)
    attributions = {t: {"m1": torch.rand(4, 3, 3), "random": rnd} for t in heads}
    out = evaluate(enc, heads, attributions, x, cls, grid=3, steps=4, batch=7)
    assert out.pop("_n_encoder_passes") < 2 * 2 * 2 * 4 * 5  # endpoints and the shared random ranking deduplicated
    for t, (W, b) in heads.items():
        def score(imgs, idx, W=W, b=b, c=cls[t]):
            return torch.softmax(enc(imgs) @ W.T + b, 1).gather(1, c[idx][:, None])[:, 0]
        for m, attr in attributions[t].items():
            d, i = deletion_insertion_curves(score, x, patch_order(attr), 3, 4)
            assert abs(out[(t, m)]["deletion_auc"] - float(auc(d).mean())) < 1e-5
            assert abs(out[(t, m)]["insertion_auc"] - float(auc(i).mean())) < 1e-5
            assert np.allclose(out[(t, m)]["score_per_image"], (auc(i) - auc(d)).tolist(), atol=1e-5)
