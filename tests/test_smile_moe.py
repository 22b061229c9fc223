"""SMILE (arXiv 2212.05191): bi-level routing vs naive loops, the gloo All2All vs a single-process reference,
and the alpha-beta model vs hand-computed values."""
import pytest
import torch
import torch.nn.functional as F

from reprolab.moe.all2all import a2a_time_bilevel, a2a_time_flat, run_distributed
from reprolab.moe.smile import MoELayer, load_balance_loss


def naive_moe(layer: MoELayer, routing: str, x: torch.Tensor):
    """Token-by-token reference: route with explicit loops over nodes/experts, run the chosen expert densely."""
    N, G = (layer.router.N, layer.router.G) if routing == "smile" else (1, layer.router.E)
    out, chosen = torch.zeros_like(x), []
    e1, e2 = layer.experts.w1, layer.experts.w2
    for t in range(len(x)):
        if routing == "switch":
            p = F.softmax(x[t] @ layer.router.w.weight.T, dim=0)
            e = int(p.argmax())
            gate = p[e]
        else:
            pn = F.softmax(x[t] @ layer.router.w_node.weight.T, dim=0)
            n = int(pn.argmax())
            pl = F.softmax(x[t] @ layer.router.w_local[n], dim=0)
            g = int(pl.argmax())
            e, gate = n * G + g, pn[n] * pl[g]
        hid = F.gelu(x[t] @ e1[e] + layer.experts.b1[e])
        out[t] = gate * (hid @ e2[e] + layer.experts.b2[e])
        chosen.append(e)
    return out, torch.tensor(chosen)


@pytest.mark.parametrize("routing", ["switch", "smile"])
def test_dispatch_combine_equals_dense_naive(routing):
    torch.manual_seed(0)
    layer = MoELayer(d=8, h=12, n_nodes=3, n_local=2, routing=routing)
    x = torch.randn(2, 11, 8)
    with torch.no_grad():
        y, _, idx = layer(x)
        ref, chosen = naive_moe(layer, routing, x.reshape(-1, 8))
    assert torch.equal(idx, chosen)
    assert torch.allclose(y.reshape(-1, 8), ref, atol=1e-6)
    assert len(set(idx.tolist())) > 2  # several experts used: the permutation is not trivial


def test_load_balance_losses_by_hand():
    T, K = 6, 3
    uniform = torch.full((T, K), 1 / K)
    assert load_balance_loss(uniform, torch.tensor([0, 1, 2, 0, 1, 2])).item() == pytest.approx(1.0)
    onehot = F.one_hot(torch.zeros(T, dtype=torch.long), K).float()
    assert load_balance_loss(onehot, torch.zeros(T, dtype=torch.long)).item() == pytest.approx(K)
    # SMILE's loss = inter-node term + mean over nodes of the intra-node term, checked by hand on a random layer
    torch.manual_seed(3)
    layer = MoELayer(d=5, h=4, n_nodes=2, n_local=3, routing="smile")
    x = torch.randn(40, 5)
    idx, gate, aux = layer.router(x)
    pn = F.softmax(x @ layer.router.w_node.weight.T, dim=1)
    node = pn.argmax(1)
    f = torch.tensor([(node == n).float().mean() for n in range(2)])
    inter = 2 * (f * pn.mean(0)).sum()
    intra = []
    for n in range(2):
        xs = x[node == n]
        pl = F.softmax(xs @ layer.router.w_local[n], dim=1)
        fl = torch.tensor([(pl.argmax(1) == g).float().mean() for g in range(3)])
        intra.append(3 * (fl * pl.mean(0)).sum())
    assert aux.item() == pytest.approx((inter + sum(intra) / 2).item(), rel=1e-5)
    assert torch.equal(idx, node * 3 + torch.stack([F.softmax(x[t] @ layer.router.w_local[node[t]], 0).argmax()
                                                    for t in range(40)]))


def test_smile_with_one_node_is_switch():
    torch.manual_seed(1)
    sw, sm = MoELayer(6, 8, 1, 4, "switch"), MoELayer(6, 8, 1, 4, "smile")
    sm.experts.load_state_dict(sw.experts.state_dict())
    with torch.no_grad():
        sm.router.w_local[0] = sw.router.w.weight.T
    x = torch.randn(30, 6)
    with torch.no_grad():
        assert torch.allclose(sw(x)[0], sm(x)[0], atol=1e-6)


def test_alpha_beta_model_by_hand():
    # N = 2 nodes, G = 2 ranks each, m = 800 bytes per rank; alpha/beta chosen for easy arithmetic
    a_e, b_e, a_i, b_i = 10.0, 0.5, 1.0, 0.1
    flat = a2a_time_flat(2, 2, 800, a_e, b_e, a_i, b_i)
    # inter: G(N-1) = 2 messages x 10 + node link bytes 2*800*1/2 = 800 x 0.5 = 400 -> 420
    # intra: (G-1) = 1 message: 1 + 800/4 * 0.1 = 21
    assert flat["inter"] == pytest.approx(420.0) and flat["intra"] == pytest.approx(21.0)
    bi = a2a_time_bilevel(2, 2, 800, a_e, b_e, a_i, b_i)
    # inter: (N-1) = 1 message x 10 + 400 = 410; intra: 1 + 800/2 * 0.1 = 41
    assert bi["inter"] == pytest.approx(410.0) and bi["intra"] == pytest.approx(41.0)
    assert bi["total"] == pytest.approx(451.0) and flat["total"] == pytest.approx(441.0)
    # one node: no inter-node traffic in either scheme
    assert a2a_time_flat(1, 4, 800, a_e, b_e, a_i, b_i)["inter"] == 0.0


def test_gloo_all2all_equals_single_process_reference():
    torch.manual_seed(2)
    N, G, d, h = 2, 2, 6, 8
    layers = {r: MoELayer(d, h, N, G, r) for r in ("switch", "smile")}
    x = torch.randn(4 * 10, d)
    res = run_distributed({k: v.state_dict() for k, v in layers.items()}, x, N, G, d, h, repeats=1)
    for routing, layer in layers.items():
        with torch.no_grad():
            ref, _, idx = layer(x)
        y = torch.cat([r[routing]["y"] for r in res])
        assert torch.allclose(y, ref, atol=1e-5), routing
        sent_inter = sent_intra = 0
        pairs = {"inter": set(), "intra": set()}  # naive: (src, dst) rank pairs that carry >= 1 token per level
        for e in range(N * G):
            want = (idx == e).nonzero().flatten()
            got = res[e][routing]["recv_ids"]
            if routing == "switch":  # flat exchange: exactly the stable permutation x[argsort(idx)] chunk
                assert torch.equal(got, want)
            else:  # two hops: the same tokens, grouped by the intermediate rank
                assert torch.equal(got.sort().values, want)
            assert torch.equal(res[e][routing]["recv_x"], x[got])
            # naive byte count: every token leaving its rank, x2 for the combine exchange
        for t, e in enumerate(idx.tolist()):
            src = t // 10
            if routing == "switch":
                if e != src:
                    sent_inter += (e // G != src // G)
                    sent_intra += (e // G == src // G)
                    pairs["inter" if e // G != src // G else "intra"].add((src, e))
            else:
                mid = (e // G) * G + src % G  # first hop keeps the local index
                sent_inter += mid != src
                sent_intra += e != mid
                if mid != src:
                    pairs["inter"].add((src, mid))
                if e != mid:
                    pairs["intra"].add((mid, e))
        got_b = {lvl: sum(r[routing]["bytes"][lvl] for r in res) for lvl in ("inter", "intra")}
        assert got_b == {"inter": 2 * sent_inter * d * 4, "intra": 2 * sent_intra * d * 4}, routing
        # messages: one dispatch per non-empty (src, dst) pair and one combine back, per level
        got_m = {lvl: sum(r[routing]["msgs"][lvl] for r in res) for lvl in ("inter", "intra")}
        assert got_m == {lvl: 2 * len(v) for lvl, v in pairs.items()}, routing
        if routing == "smile":  # each rank talks to at most N - 1 ranks across nodes (Switch: up to G (N - 1))
            assert all(r[routing]["msgs"]["inter"] <= 2 * (N - 1) for r in res)


def test_same_seed_same_init_of_every_non_router_parameter():
    """Pairing by seed: Switch and SMILE draw different numbers of router weights, yet for the same seed every other
    parameter (embeddings, attention, experts of every block, head) must be identical, and the global random stream
    after construction too (so later draws, e.g. dropout or batches, stay paired)."""
    from reprolab.moe.smile import MoELM

    params, after = {}, {}
    for routing in ("switch", "smile"):
        torch.manual_seed(0)
        params[routing] = dict(MoELM(60, 16, 2, 24, 3, 8, 4, 4, routing).named_parameters())
        after[routing] = torch.rand(4)
    shared = [n for n in params["switch"] if ".router." not in n]
    assert shared == [n for n in params["smile"] if ".router." not in n]
    assert len(shared) > 10 and any("experts" in n for n in shared) and "head.weight" in shared
    for n in shared:
        assert torch.equal(params["switch"][n], params["smile"][n]), n
    assert torch.equal(after["switch"], after["smile"])
    # the routers themselves are still random (not all equal to zero, different across blocks)
    r = params["smile"]
    assert not torch.equal(r["blocks.0.moe.router.w_local"], r["blocks.1.moe.router.w_local"])
    # and a different seed changes the shared parameters (the pairing is by seed, not a constant init)
    torch.manual_seed(1)
    other = dict(MoELM(60, 16, 2, 24, 3, 8, 4, 4, "switch").named_parameters())
    assert not torch.equal(other["blocks.0.moe.experts.w1"], params["switch"]["blocks.0.moe.experts.w1"])
