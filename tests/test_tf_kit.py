"""The issue-16 transformer kit against independent references: naive attention, zero-padded full networks,
unrolled recursion, naive relation / KD loops, a hand AdamW loop."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from reprolab.nas import harness
from reprolab.tf import distill
from reprolab.tf.tiny import TFConfig, TinyTransformer, lm_loss, lm_nll, unigram_nll

KW = dict(d_model=24, n_layers=3, n_heads=4, head_dim=6, mlp_hidden=40)


def make(kind, **extra):
    torch.manual_seed(0)
    kw = dict(KW)
    if kind in ("vit", "frames"):
        kw["n_classes"] = 5
    kw.update(extra)
    return TinyTransformer(TFConfig(kind=kind, **kw)).eval()


def inputs(kind, B=3):
    g = torch.Generator().manual_seed(1)
    if kind in ("causal", "encoder"):
        return torch.randint(0, 256, (B, 10), generator=g)
    if kind == "vit":
        return torch.randn(B, 1, 16, 16, generator=g)
    return torch.randn(B, 9, 12, generator=g)


def naive_block(blk, x, heads, mlp, causal, mask=None):
    """Pre-LN block written out with explicit per-head softmax loops (no SDPA)."""
    C, hd = x.size(-1), blk.cfg.head_dim
    ln = lambda m, z: F.layer_norm(z, (C,), m.weight[:C], m.bias[:C], m.eps)  # noqa: E731
    lin = lambda p, z, o: z @ p.linear.weight[:o, :z.size(-1)].T + p.linear.bias[:o]  # noqa: E731
    h = ln(blk.ln1, x)
    q, k, v = lin(blk.q, h, heads * hd), lin(blk.k, h, heads * hd), lin(blk.v, h, heads * hd)
    B, T, _ = x.shape
    out = torch.zeros(B, T, heads * hd)
    for b in range(B):
        for a in range(heads):
            sl = slice(a * hd, (a + 1) * hd)
            for i in range(T):
                s = torch.stack([q[b, i, sl] @ k[b, j, sl] / math.sqrt(hd) for j in range(T)])
                for j in range(T):
                    if (causal and j > i) or (mask is not None and not mask[b, j]):
                        s[j] = -float("inf")
                p = torch.softmax(s, 0)
                out[b, i, sl] = sum(p[j] * v[b, j, sl] for j in range(T))
    x = x + lin(blk.o, out, C)
    return x + lin(blk.fc2, F.gelu(lin(blk.fc1, ln(blk.ln2, x), mlp)), C)


@pytest.mark.parametrize("causal", [True, False])
def test_block_matches_naive_attention(causal):
    m = make("causal")
    blk = m.blocks[0]
    blk.active_heads, blk.active_mlp = 3, 17
    x = torch.randn(2, 6, 20)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    for mk in (None, mask):
        got, _ = blk(x, causal, mk)
        ref = naive_block(blk, x, 3, 17, causal, mk)
        assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("kind", ["causal", "encoder", "vit", "frames"])
def test_child_equals_extracted_subnet(kind):
    m = make(kind)
    x = inputs(kind)
    cfg = m.config_from(embed=16, depth=2, heads=2, mlp=24)
    m.set_active_subnet(cfg)
    child = m(x)
    sub = m.get_active_subnet().eval()
    assert sub.cfg.d_model == 16 and sub.cfg.n_layers == 2 and sub.cfg.n_heads == 2 and sub.cfg.mlp_hidden == 24
    assert torch.allclose(child, sub(x), atol=1e-5)
    assert m.n_params(cfg) == sum(p.numel() for p in sub.parameters())
    m.set_active_subnet(m.max_config())
    assert torch.allclose(m(x), m.get_active_subnet()(x), atol=1e-6)


def test_nonuniform_child_equals_zero_padded_full_network():
    """Independent reference for per-layer heads / widths: the full network with the unused heads' output columns
    and the unused hidden units zeroed computes the same function as the sliced child (embed and depth full)."""
    m = make("encoder")
    x = inputs("encoder")
    heads, mlp = [1, 4, 2], [40, 8, 23]
    m.set_active_subnet({"embed": 24, "depth": 3, "heads": heads, "mlp": mlp})
    child = m(x)
    ref = make("encoder")
    with torch.no_grad():
        for blk, h, w in zip(ref.blocks, heads, mlp):
            blk.o.linear.weight[:, h * 6:] = 0
            blk.fc1.linear.weight[w:] = 0
            blk.fc1.linear.bias[w:] = 0
            blk.fc2.linear.weight[:, w:] = 0
    assert torch.allclose(child, ref(x), atol=1e-5)


def test_depth_uses_the_first_layers_and_recursion_unrolls():
    m = make("causal")
    x = inputs("causal")
    m.set_active_subnet(m.config_from(24, 1, 4, 40))
    two = make("causal", n_layers=1)
    two.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith(("blocks.1", "blocks.2"))})
    assert torch.allclose(m(x), two(x), atol=1e-6)
    # recursion: one block looped 3 times == three layers holding copies of that block
    rec = make("causal", n_layers=1, loops=(3,))
    unrolled = make("causal", n_layers=3)
    sd = {k: v for k, v in rec.state_dict().items() if not k.startswith("blocks.")}
    for i in range(3):
        sd.update({k.replace("blocks.0", f"blocks.{i}"): v for k, v in rec.state_dict().items()
                   if k.startswith("blocks.0")})
    unrolled.load_state_dict(sd)
    assert torch.allclose(rec(x), unrolled(x), atol=1e-5)
    assert rec.macs() == unrolled.macs() and rec.n_params() < unrolled.n_params()


def test_causal_model_does_not_see_the_future():
    m = make("causal")
    x = inputs("causal")
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % 256
    assert torch.allclose(m(x)[:, :6], m(y)[:, :6], atol=1e-6)
    assert not torch.allclose(m(x)[:, 6:], m(y)[:, 6:])


def test_patchify_matches_unfold():
    m = make("vit")
    x = inputs("vit")
    ref = F.unfold(x, kernel_size=4, stride=4).transpose(1, 2)  # (B, N, C*p*p), same order
    assert torch.equal(m.patchify(x), ref)


def test_return_states_and_padding_mask():
    m = make("encoder", n_classes=3)
    x = inputs("encoder")
    out = m(x, return_states=True)
    assert len(out["hidden"]) == 4 and len(out["qkv"]) == 3 and out["qkv"][0][0].shape == (3, 4, 10, 6)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[:, 7:] = False
    y = x.clone()
    y[:, 7:] = 5  # padding content must not matter
    assert torch.allclose(m(x, mask=mask), m(y, mask=mask), atol=1e-6)


def test_sampling_and_validation():
    m = make("causal")
    space = {"embed": [16, 24], "depth": [2, 3], "heads": [2, 4], "mlp": [20, 40]}
    rng = random.Random(0)
    for _ in range(20):
        cfg = m.sample_config(space, rng)
        m.set_active_subnet(cfg)
        assert m.active_config() == m.validate_config(cfg)
    assert m.space_min(space) == {"embed": 16, "depth": 2, "heads": [2, 2], "mlp": [20, 20]}
    with pytest.raises(ValueError, match="embed"):
        m.set_active_subnet({"embed": 99, "depth": 1, "heads": [1], "mlp": [1]})
    with pytest.raises(ValueError, match="kind"):
        TFConfig(kind="rnn")
    with pytest.raises(ValueError, match="loops"):
        TFConfig(n_layers=2, loops=(1,))


def test_logit_kd_and_hidden_losses_match_naive():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    T = 2.0
    ref = 0.0
    for b in range(2):
        for i in range(5):
            p, q = torch.softmax(t[b, i] / T, 0), torch.softmax(s[b, i] / T, 0)
            ref += float((p * (p.log() - q.log())).sum())
    assert distill.logit_kd(s, t, T).item() == pytest.approx(ref / 10 * T * T, rel=1e-5)
    pred, tgt = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 1, 1]]).bool()
    vals = [float((pred[b, i] - tgt[b, i]).abs().mean() - F.logsigmoid(F.cosine_similarity(pred[b, i], tgt[b, i], 0)))
            for b in range(2) for i in range(5) if mask[b, i]]
    assert distill.hidden_loss(pred, tgt, "l1_cos", mask).item() == pytest.approx(sum(vals) / len(vals), rel=1e-5)
    assert distill.hidden_loss(pred, tgt, "mse").item() == pytest.approx(float(((pred - tgt) ** 2).mean()), rel=1e-5)
    proj = distill.HiddenProjector(8, 12, n=2)
    assert proj(pred[..., :5], 1).shape == (2, 5, 12)
    with pytest.raises(ValueError, match="kind"):
        distill.hidden_loss(pred, tgt, "cos")


def test_minilmv2_relation_kd_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    B, T, Ds, Dt, A = 2, 5, 8, 12, 4
    s = [torch.randn(B, T, Ds, generator=g) for _ in range(3)]
    t = [torch.randn(B, T, Dt, generator=g) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()

    def rel(x, a, b, i, n):
        d = x.size(-1) // A
        xa = x[b, :, a * d:(a + 1) * d]
        sc = torch.stack([xa[i] @ xa[j] / math.sqrt(d) for j in range(n)])
        return torch.softmax(sc, 0)

    ref = 0.0
    for ss, tt in zip(s, t):
        tot, cnt = 0.0, 0
        for b in range(B):
            n = int(mask[b].sum())
            for a in range(A):
                for i in range(n):
                    p, q = rel(tt, a, b, i, n), rel(ss, a, b, i, n)
                    tot += float((p * (p.log() - q.log())).sum())
                    cnt += 1
        ref += tot / cnt
    got = distill.minilmv2_loss(s, t, A, mask)
    assert got.item() == pytest.approx(ref, rel=1e-5)
    assert distill.minilmv2_loss(t, t, A).item() == pytest.approx(0.0, abs=1e-6)
    # per-head (B, h, T, d) inputs are merged head-major
    per_head = [x.view(B, T, 2, Ds // 2).transpose(1, 2) for x in s]
    assert distill.minilmv2_loss(per_head, t, A, mask).item() == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="n_rel"):
        distill.relation_logprobs(s[0], 3)


def test_hf_qkv_hooks_capture_the_bert_projections():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32)).eval()
    store, handles = distill.hf_qkv_hooks(bert, 1)
    ids = torch.randint(0, 50, (2, 7))
    out = bert(ids, output_hidden_states=True)
    for h in handles:
        h.remove()
    attn = bert.encoder.layer[1].attention.self
    assert torch.allclose(store["q"], attn.query(out.hidden_states[1]), atol=1e-6)
    assert torch.allclose(store["v"], attn.value(out.hidden_states[1]), atol=1e-6)


def test_lm_data_windows_are_shifted_and_deterministic():
    from reprolab.tf.data import lm_data

    d = lm_data(seq_len=16, n_train=8, n_val=4, n_test=4, seed=3)
    X, Y = d["train"]
    assert X.shape == (8, 16) and torch.equal(X[:, 1:], Y[:, :-1])
    assert torch.equal(lm_data(seq_len=16, n_train=8, n_val=4, n_test=4, seed=3)["train"][0], X)
    assert not torch.equal(d["val"][0], d["test"][0])


def test_heldout_halves_mix_every_text_equally():
    """Validation and test take the first / second half of EACH text's held-out tail (not the two halves of the
    joined tail, which would put different texts in each), and a window subset spans the whole held-out text."""
    from reprolab.data import TEXTS, load_text
    from reprolab.lm.tiny_llama import normalize
    from reprolab.tf.data import heldout_parts, lm_data

    p = heldout_parts()
    val, test = (bytes(p[k].tolist()).decode() for k in ("val", "test"))
    for name in TEXTS:
        text = normalize(load_text(name))
        held = text[int(len(text) * 0.9):]
        assert held[:len(held) // 2] in val and held[len(held) // 2:] in test
    assert abs(len(val) - len(test)) <= len(TEXTS)
    X = lm_data(seq_len=16, n_train=1, n_val=10, n_test=10)["val"][0]
    assert bytes(X[-1].tolist()).decode() in val[-len(val) // 10:]  # the last window lies near the end


def test_train_model_adamw_equals_hand_loop():
    torch.manual_seed(0)
    m1 = make("causal", n_layers=1)
    m2 = make("causal", n_layers=1)
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, 256, (12, 8), generator=g)
    Y = torch.randint(0, 256, (12, 8), generator=g)
    data = {"train": (X, Y)}
    harness.train_model(m1, data, 4, lambda m, x, y, s: lm_loss(m, x, y), lr=1e-3, optimizer="adamw",
                        weight_decay=0.01, batch_size=4, seed=5, schedule="constant", grad_clip=1.0)
    opt = torch.optim.AdamW(m2.parameters(), lr=1e-3, weight_decay=0.01)
    it = harness.batches(X, Y, 4, torch.Generator().manual_seed(5))
    m2.train()
    for _ in range(4):
        x, y = next(it)
        opt.zero_grad()
        lm_loss(m2, x, y).backward()
        torch.nn.utils.clip_grad_norm_(list(m2.parameters()), 1.0)
        opt.step()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(p1, p2, atol=1e-6)
    with pytest.raises(ValueError, match="optimizer"):
        harness.train_model(m1, data, 1, lambda m, x, y, s: lm_loss(m, x, y), lr=1e-3, optimizer="lion")


def test_lm_nll_and_unigram_nll_match_a_per_token_loop():
    torch.manual_seed(0)
    model = TinyTransformer(TFConfig(kind="causal", d_model=16, n_layers=1, n_heads=2, mlp_hidden=32, vocab_size=11,
                                     max_len=8, dropout=0.5))
    X, Y = torch.randint(0, 11, (5, 8)), torch.randint(0, 11, (5, 8))
    model.eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(X), -1)
    model.train()
    naive = -sum(float(logp[i, t, Y[i, t]]) for i in range(5) for t in range(8)) / 40
    for bs in (1, 2, 5, 64):  # batching does not change the mean; dropout is off; the training mode comes back
        assert lm_nll(model, X, Y, batch_size=bs) == pytest.approx(naive, rel=1e-6)
        assert model.training
    train, test = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 3, 2])
    # add-one counts over a vocabulary of 4: {0: 3, 1: 2, 2: 4, 3: 1}, total 10
    assert unigram_nll(train, test, vocab=4) == pytest.approx(-(math.log(.3) + math.log(.1) + math.log(.4)) / 3)
