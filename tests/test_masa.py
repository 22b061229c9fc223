"""MASA: the atom projection against an explicit loop over atoms, sharing (one dictionary per role, counted once),
parameter counts by hand for every arm, gradients to atoms and coefficients, the sharing schedules, GQA against an
explicit head loop, the low-rank factorisation, the unigram reference and the perplexity."""
import math

import pytest
import torch
import torch.nn.functional as F

from reprolab.tf import masa as M

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dict(d_model=24, n_layers=6, n_heads=3, mlp_hidden=32, seq_len=16, bias=False, n_atoms=2, lowrank_rank=None,
           n_kv_heads=1)


class _Fixed(torch.nn.Module):
    """A projection with a given (possibly non-leaf) weight matrix."""

    def __init__(self, W):
        super().__init__()
        self.W = W

    def forward(self, h, out=None):
        return F.linear(h, self.W[:out])


def _model(arm, **kw):
    return M.build_model(arm, {**CFG, **kw}, seed=0)


def test_atom_projection_equals_coefficient_weighted_sum_of_atoms():
    torch.manual_seed(0)
    D = M.AtomDictionary(3, 5, 7)
    lin = M.AtomLinear(D, bias=True)
    with torch.no_grad():
        lin.bias.normal_()
    x = torch.randn(2, 4, 5)
    # naive loop: y[b, t, o] = sum_s c_s sum_i D_s[o, i] x[b, t, i] + bias[o]
    y_ref = torch.zeros(2, 4, 7)
    for s in range(3):
        for o in range(7):
            for i in range(5):
                y_ref[..., o] += lin.coef[s] * D.atoms[s, o, i] * x[..., i]
    y_ref += lin.bias
    assert torch.allclose(lin(x), y_ref, atol=1e-6)
    assert torch.allclose(lin(x, 4), y_ref[..., :4], atol=1e-6)  # first-k rows (the kit's elastic interface)
    # mutation: dropping one atom's term changes the output
    with torch.no_grad():
        lin.coef[1] = 0.0
    assert not torch.allclose(lin(x), y_ref, atol=1e-4)


def test_masa_model_shares_one_dictionary_per_role_across_layers():
    m = _model("masa")
    for r in M.ATTN_ROLES:
        dicts = {id(getattr(b, r).dictionary) for b in m.blocks}
        assert len(dicts) == 1  # one dictionary for all layers
        coefs = {id(getattr(b, r).coef) for b in m.blocks}
        assert len(coefs) == CFG["n_layers"]  # own coefficients per layer
    assert len({id(m.blocks[0].q.dictionary), id(m.blocks[0].k.dictionary), id(m.blocks[0].v.dictionary),
                id(m.blocks[0].o.dictionary)}) == 4  # separate dictionaries per projection type
    # the feed-forward stays dense and unshared
    assert len({id(b.fc1) for b in m.blocks}) == CFG["n_layers"]
    # the forward pass uses W_l = sum_s c_{l,s} D_s: replace layer 2's q by the explicit matrix and compare
    x = torch.randint(0, 256, (2, 8))
    y = m(x)
    blk = m.blocks[2]
    W = sum(blk.q.coef[s] * blk.q.dictionary.atoms[s] for s in range(CFG["n_atoms"]))
    old = blk.q
    blk.q = _Fixed(W.detach().clone())
    assert torch.allclose(m(x), y, atol=1e-5)
    blk.q = old


def test_attention_parameter_counts_by_hand():
    d, L, S, h = 24, 6, 2, 3
    for arm in M.ARMS:
        m = _model(arm)
        assert M.attention_params(m) == M.attention_budget_formula(arm, d, L, h, S, n_kv_heads=1), arm
    # explicit numbers: full 4 L d^2; MASA 4 (S d^2 + L S); cycle / sequence 4 S d^2
    assert M.attention_params(_model("full")) == 4 * 6 * 24 * 24 == 13824
    assert M.attention_params(_model("masa")) == 4 * (2 * 576 + 12) == 4656
    assert M.attention_params(_model("cycle")) == M.attention_params(_model("sequence")) == 4 * 2 * 576
    r = M.lowrank_rank(24, 24, 6, 2)
    assert r == round((2 * 576 + 12) / (6 * 48)) == 4
    assert M.attention_params(_model("lowrank")) == 4 * 6 * r * 48
    assert M.attention_params(_model("gqa")) == 6 * (2 * 576 + 2 * 24 * 8)
    # with biases: MASA keeps one bias per layer
    mb = _model("masa", bias=True)
    assert M.attention_params(mb) == 4 * (2 * 576 + 12 + 6 * 24)
    # the non-attention part is the same in every arm
    rest = {arm: M.total_params(_model(arm)) - M.attention_params(_model(arm)) for arm in M.ARMS}
    assert len(set(rest.values())) == 1
    # S = L / 3 removes two thirds of the attention parameters (up to the L S coefficients)
    assert 1 - 4656 / 13824 == pytest.approx(2 / 3 - 48 / 13824)


def test_gradients_reach_atoms_and_coefficients():
    m = _model("masa")
    x = torch.randint(0, 256, (2, 8))
    loss = F.cross_entropy(m(x).reshape(-1, 256), torch.randint(0, 256, (16,)))
    loss.backward()
    for r in M.ATTN_ROLES:
        D = getattr(m.blocks[0], r).dictionary.atoms
        assert D.grad is not None and float(D.grad.abs().sum()) > 0
        for b in m.blocks:
            c = getattr(b, r).coef
            assert c.grad is not None and float(c.grad.abs().sum()) > 0
    # the atoms are one parameter in the optimiser (deduplicated), with gradient accumulated from every layer
    names = [n for n, _ in m.named_parameters() if "atoms" in n]
    assert len(names) == 4
    # gradient of the atoms = sum over layers of c_{l,s} dL/dW_l (chain rule through the einsum), checked for q
    m.zero_grad()
    Ws = [b.q.weight() for b in m.blocks]
    for W in Ws:
        W.retain_grad()
    blocks_q = [b.q for b in m.blocks]
    for b, W in zip(m.blocks, Ws):
        b.q = _Fixed(W)
    loss = F.cross_entropy(m(x).reshape(-1, 256), torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(1)))
    loss.backward()
    D = blocks_q[0].dictionary.atoms
    for s in range(CFG["n_atoms"]):
        ref = sum(q.coef[s].detach() * W.grad for q, W in zip(blocks_q, Ws))
        assert torch.allclose(D.grad[s], ref, atol=1e-7)
    for q, W in zip(blocks_q, Ws):
        assert torch.allclose(q.coef.grad, torch.einsum("soi,oi->s", D.detach(), W.grad), atol=1e-7)
    for b, q in zip(m.blocks, blocks_q):
        b.q = q


def test_sharing_schedules():
    assert [M.shared_group(l, 6, 2, "cycle") for l in range(6)] == [0, 1, 0, 1, 0, 1]
    assert [M.shared_group(l, 6, 2, "sequence") for l in range(6)] == [0, 0, 0, 1, 1, 1]
    assert [M.shared_group(l, 6, 3, "sequence") for l in range(6)] == [0, 0, 1, 1, 2, 2]
    for arm, groups in (("cycle", [0, 1, 0, 1, 0, 1]), ("sequence", [0, 0, 0, 1, 1, 1])):
        m = _model(arm)
        for r in M.ATTN_ROLES:
            ids = [id(getattr(b, r)) for b in m.blocks]
            for i in range(6):
                for j in range(6):
                    assert (ids[i] == ids[j]) == (groups[i] == groups[j]), (arm, r, i, j)
        assert len({id(getattr(m.blocks[0], r)) for r in M.ATTN_ROLES}) == 4  # q, k, v, o not tied to each other
    with pytest.raises(ValueError):
        M.shared_group(0, 6, 2, "reverse")


def test_gqa_projection_against_explicit_head_loop():
    torch.manual_seed(0)
    g = M.GQALinear(8, n_kv=2, head_dim=3, group=2, bias=True)
    x = torch.randn(5, 8)
    y = g(x)
    assert y.shape == (5, 12)
    W, b = g.lin.linear.weight, g.lin.linear.bias
    for head in range(4):
        kv = head // 2
        ref = x @ W[kv * 3:(kv + 1) * 3].T + b[kv * 3:(kv + 1) * 3]
        assert torch.allclose(y[:, head * 3:(head + 1) * 3], ref, atol=1e-6)
    # in the model: heads sharing a kv head have identical keys
    m = _model("gqa", n_heads=3, n_kv_heads=1)
    out = m(torch.randint(0, 256, (1, 8)), return_states=True)
    q, k, v = out["qkv"][0]
    assert torch.allclose(k[:, 0], k[:, 1]) and torch.allclose(v[:, 0], v[:, 2])
    assert not torch.allclose(q[:, 0], q[:, 1])
    with pytest.raises(ValueError):
        _model("gqa", n_kv_heads=2)  # 2 does not divide 3 heads


def test_lowrank_is_a_rank_r_product():
    torch.manual_seed(0)
    lr = M.LowRankLinear(10, 12, 3, bias=False)
    x = torch.randn(4, 10)
    assert torch.allclose(lr(x), x @ (lr.B @ lr.A).T, atol=1e-6)
    assert torch.linalg.matrix_rank(lr.weight()) == 3


def test_init_scale_matches_dense_layers():
    torch.manual_seed(0)
    D = M.AtomDictionary(4, 256, 256)
    Ws = torch.stack([M.AtomLinear(D).weight() for _ in range(50)])
    assert float(Ws.std()) == pytest.approx(M.INIT_STD, rel=0.1)
    W = M.LowRankLinear(256, 256, 16).weight()
    assert float(W.std()) == pytest.approx(M.INIT_STD, rel=0.1)


def test_unigram_and_perplexity():
    train = torch.tensor([[0, 0, 1, 2]])
    y = torch.tensor([[0, 1]])
    # add-one over a 4-symbol vocabulary: p(0) = 3/8, p(1) = 2/8
    assert M.unigram_perplexity(train, y, vocab=4) == pytest.approx(math.exp(-(math.log(3 / 8) + math.log(2 / 8)) / 2))
    m = _model("full")
    X = torch.randint(0, 256, (5, 16))
    Y = torch.randint(0, 256, (5, 16))
    with torch.no_grad():
        ce = F.cross_entropy(m(X).reshape(-1, 256), Y.reshape(-1))
    assert M.perplexity(m, {"test": (X, Y)}, "test", batch_size=2) == pytest.approx(math.exp(float(ce)), rel=1e-5)


def test_bad_arm_and_atoms_rejected():
    with pytest.raises(ValueError):
        _model("albert")
    with pytest.raises(ValueError):
        _model("masa", n_atoms=7)


def test_ngram_perplexity_against_naive_count_loop():
    from collections import Counter

    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 4, (6, 7), generator=g)  # 6 windows of 6 targets over a 4-byte alphabet
    ev = torch.randint(0, 4, (3, 7), generator=g)
    train, evaluate = (seqs[:, :-1], seqs[:, 1:]), (ev[:, :-1], ev[:, 1:])
    for n in (1, 2, 3):
        full, ctx = Counter(), Counter()
        for row in seqs.tolist():
            for t in range(1, len(row)):
                c = tuple(row[max(0, t - n + 1):t])
                full[c + (row[t],)] += 1
                ctx[c] += 1
        nll, cnt = 0.0, 0
        for row in ev.tolist():
            for t in range(1, len(row)):
                c = tuple(row[max(0, t - n + 1):t])
                nll -= math.log((full[c + (row[t],)] + 0.5) / (ctx[c] + 0.5 * 4))
                cnt += 1
        assert M.ngram_perplexity(train, evaluate, n, k=0.5, vocab=4) == pytest.approx(math.exp(nll / cnt)), n
    # a training set scored on itself: the trigram fits better than the bigram, the bigram better than the unigram
    p = [M.ngram_perplexity(train, train, n, k=0.01, vocab=4) for n in (1, 2, 3)]
    assert p[0] > p[1] > p[2]


def test_perplexity_without_attention_equals_zeroed_output_projection():
    import copy

    m = _model("full")
    with torch.no_grad():
        for b in m.blocks:  # give the attention a real effect first
            b.o.linear.weight.normal_(0, 0.3)
    data = {"test": (torch.randint(0, 256, (4, 16)), torch.randint(0, 256, (4, 16)))}
    ref = copy.deepcopy(m)
    with torch.no_grad():
        for b in ref.blocks:
            b.o.linear.weight.zero_()  # no bias: the attention adds exactly zero to the residual stream
    p_abl = M.perplexity_without_attention(m, data, "test")
    assert p_abl == pytest.approx(M.perplexity(ref, data, "test"), rel=1e-6)
    assert M.perplexity(m, data, "test") != pytest.approx(p_abl, rel=1e-3)  # the ablation did something
    assert all("attention" not in vars(b) for b in m.blocks)  # restored afterwards


def test_no_weight_decay_only_on_vectors():
    m = _model("masa")
    nd = {id(p) for p in M.no_decay_params(m)}
    for b in m.blocks:
        for r in M.ATTN_ROLES:
            assert id(getattr(b, r).coef) in nd  # coefficients: no decay
            assert id(getattr(b, r).dictionary.atoms) not in nd  # atoms: decayed like every matrix
        assert id(b.ln1.weight) in nd and id(b.fc1.linear.weight) not in nd
    n_vec = sum(p.numel() for p in M.no_decay_params(m))
    ln = sum(p.numel() for n_, p in m.named_parameters() if "ln" in n_)  # LayerNorm gains and shifts
    assert n_vec == ln + 256 + 4 * CFG["n_layers"] * CFG["n_atoms"]  # + the output head's bias + the coefficients


def test_quick_size_budgets_by_hand():
    # d 64, L 6, S 2 (the quick profile): r = round((2 * 64^2 + 12) / (6 * 128)) = round(10.68) = 11
    assert M.lowrank_rank(64, 64, 6, 2) == 11
    masa = M.attention_budget_formula("masa", 64, 6, 4, 2)
    assert masa == 4 * (2 * 4096 + 12) == 32816
    assert M.attention_budget_formula("lowrank", 64, 6, 4, 2) == 4 * 6 * 11 * 128 == 33792  # 2.97 % above MASA
    assert M.attention_budget_formula("cycle", 64, 6, 4, 2) == 32768


def test_train_arm_decays_atoms_not_coefficients():
    # one AdamW step from the same init and batch: the gradient step is the same with and without weight decay,
    # so only decayed parameters differ between the two runs
    cfg = {**CFG, "steps": 1, "batch_size": 2, "lr": 0.01, "betas": [0.9, 0.95], "warmup_steps": 0, "grad_clip": 1.0}
    X = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    data = {"train": (X, torch.roll(X, -1, 1))}
    m0, _ = M.train_arm("masa", data, {**cfg, "weight_decay": 0.0}, seed=0)
    m1, _ = M.train_arm("masa", data, {**cfg, "weight_decay": 0.5}, seed=0)
    b0, b1 = m0.blocks[1], m1.blocks[1]
    assert torch.equal(b0.q.coef, b1.q.coef)
    assert not torch.allclose(b0.q.dictionary.atoms, b1.q.dictionary.atoms)
    assert torch.allclose(b1.q.dictionary.atoms, b0.q.dictionary.atoms - 0.01 * 0.5 * M.build_model(
        "masa", cfg, 0).blocks[1].q.dictionary.atoms, atol=1e-7)


def test_params_schema_rejects_bad_values():
    import jsonschema

    from reprolab.config import load_params
    from reprolab.registry import paper_entry

    schema = {"type": "object", "properties": paper_entry("masa")["params"]}
    jsonschema.validate(load_params("masa", "quick"), schema)  # the shipped quick profile is valid
    for bad in ({"n_atoms": 0}, {"n_test": 0}, {"ngram_k": 0}, {"betas": [0.9, 1.0]}, {"lr": 0}, {"n_layers": 2}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
