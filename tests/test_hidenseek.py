"""HideNseek (arXiv 2206.04385): SynFlow, the straight-through supermasks, bits on the wire and the server's
aggregation, each against an independent computation: local training by a hand Adam step, the Flower strategy's
aggregate_fit (no Ray) against the direct rules and the byte ledger. The Flower engine end to end: test_distributed.py."""
import numpy as np
import pytest
import torch

from reprolab.fed.hidenseek import (MaskModel, aggregate, effective_weights, majority_vote, mean_signs, pack,
                                    synflow_prune, synflow_scores, unpack)


def tiny_net(seed=0, sizes=(5, 4, 3, 2)):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((o, i)).astype(np.float32) for i, o in zip(sizes[:-1], sizes[1:])]


def exact_synflow(Ws, Ms):
    """R = 1^T |W_L M_L| ... |W_1 M_1| 1 by matrix products; dR/dW_l[i, j] = a_l[i] b_l[j] M_l[i, j]."""
    A = [np.abs(w.astype(np.float64)) * m for w, m in zip(Ws, Ms)]
    out = []
    for l in range(len(A)):
        b = np.ones(A[0].shape[1])
        for k in range(l):
            b = A[k] @ b  # the flow into layer l's inputs
        a = np.ones(A[-1].shape[0])
        for k in range(len(A) - 1, l, -1):
            a = a @ A[k]  # the flow from layer l's outputs to the output sum
        out.append(np.abs(np.abs(Ws[l]).astype(np.float64) * np.outer(a, b) * Ms[l]))
    return out


def test_synflow_scores_match_the_closed_form():
    Ws = tiny_net()
    ones = [np.ones_like(w) for w in Ws]
    for got, want in zip(synflow_scores(Ws, ones), exact_synflow(Ws, ones)):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    # with a mask: pruned weights carry no flow and get score 0
    rng = np.random.default_rng(1)
    Ms = [(rng.random(w.shape) > 0.3).astype(np.float32) for w in Ws]
    for got, want, m in zip(synflow_scores(Ws, Ms), exact_synflow(Ws, Ms), Ms):
        np.testing.assert_allclose(got, want, rtol=1e-12)
        assert np.all(got[m == 0] == 0)


def test_synflow_prune_is_the_iterative_global_threshold():
    Ws = tiny_net(2, (6, 5, 4, 3))
    n = sum(w.size for w in Ws)
    density, iters = 0.4, 5
    got = synflow_prune(Ws, density, iters)
    # naive loop: closed-form scores, sort all of them, drop the int((1 - d_k) n) lowest (ties included), k = 1..iters
    Ms = [np.ones_like(w) for w in Ws]
    for k in range(iters):
        d = density ** ((k + 1) / iters)
        sc = exact_synflow(Ws, Ms)
        flat = np.sort(np.concatenate([s.ravel() for s in sc]))
        thr = flat[int((1 - d) * n) - 1]
        Ms = [(s > thr).astype(np.float32) for s in sc]
    for g, m in zip(got, Ms):
        np.testing.assert_array_equal(g, m)
    kept = sum(int(m.sum()) for m in got)
    assert kept == n - int((1 - density) * n)
    assert all(m.sum() > 0 for m in got), "no layer collapses"


@pytest.mark.parametrize("kind", ["sign", "binary"])
def test_straight_through_gradient_by_hand(kind):
    torch.manual_seed(0)
    theta = torch.randn(3, 4, dtype=torch.float64)
    P = torch.tensor(np.random.default_rng(0).random((3, 4)) > 0.3, dtype=torch.float64)
    s = torch.randn(3, 4, dtype=torch.float64)
    s[0, 0] = 0.0  # sign(0) = +1, 1[0 >= 0] = 1
    s.requires_grad_(True)
    x = torch.randn(5, 4, dtype=torch.float64)
    G = torch.randn(5, 3, dtype=torch.float64)
    (W,) = effective_weights([theta], [P], [s], kind)
    (x @ W.T * G).sum().backward()
    m = torch.where(s >= 0, 1.0, -1.0 if kind == "sign" else 0.0).double()
    np.testing.assert_allclose(W.detach().numpy(), (theta * P * m).numpy(), rtol=0, atol=0)
    assert m[0, 0] == 1.0
    # dL/dW_eff = G^T x; through W_eff = theta * P * m(s) with dm/ds := 1: dL/ds = G^T x * theta * P
    np.testing.assert_allclose(s.grad.numpy(), (G.T @ x * theta * P).numpy(), rtol=1e-12)


def test_packbits_round_trip_and_size():
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 9, 1001):
        b = rng.random(n) > 0.5
        p = pack(b)
        assert p.dtype == np.uint8 and p.size == -(-n // 8)
        np.testing.assert_array_equal(unpack(p, n), b)
    # big-endian bit order within a byte, as np.packbits documents
    assert pack(np.array([1, 0, 0, 0, 0, 0, 0, 1], bool))[0] == 0b10000001


def test_server_aggregation_against_a_direct_loop():
    rng = np.random.default_rng(3)
    K, n = 5, 200
    bits = [rng.random(n) > 0.5 for _ in range(K)]
    w = rng.integers(1, 50, K)
    prev = rng.random(n) > 0.5
    bits[1][:10], bits[2][:10], w[1], w[2] = True, False, 7, 7  # exact ties on the first 10 positions ...
    for k in (0, 3, 4):
        bits[k][:10] = ~bits[k][:10] if k == 0 else bits[k][:10]
    bits[3][:10], bits[4][:10] = True, False
    w[3], w[4] = 11, 11
    bits[0][:10] = True
    bits.append(np.zeros(n, bool))
    w = np.append(w, w[0])  # ... client 5 cancels client 0 there
    got_major = majority_vote(bits, w, prev)
    got_mean = mean_signs(bits, w)
    for j in range(n):
        tot = sum(int(w[k]) * (1 if bits[k][j] else -1) for k in range(len(bits)))
        want = prev[j] if tot == 0 else tot > 0
        assert got_major[j] == want
        assert got_mean[j] == pytest.approx(tot / sum(int(x) for x in w), abs=1e-7)
    assert np.array_equal(got_major[:10], prev[:10])  # the ties kept the previous sign
    np.testing.assert_array_equal(aggregate(bits, w, prev, "majority"), got_major)
    np.testing.assert_array_equal(aggregate(bits, w, prev, "mean"), got_mean)


def test_mask_model_bits_follow_the_surviving_positions():
    theta = tiny_net(4)
    P = [(np.random.default_rng(i).random(t.shape) > 0.5).astype(np.float32) for i, t in enumerate(theta)]
    model = MaskModel(theta, P)
    rng = np.random.default_rng(0)
    bits = rng.random(model.n_bits) > 0.5
    scores = model.scores_from_bits(bits, 0.7)
    np.testing.assert_array_equal(model.bits_from_scores(scores), bits)
    Ws = model.weights_from_bits(bits, "sign")
    i = 0
    for W, t, p in zip(Ws, theta, P):
        keep = p.ravel() > 0
        k = int(keep.sum())
        want = np.zeros(t.size, np.float32)
        want[keep] = t.ravel()[keep] * np.where(bits[i:i + k], 1.0, -1.0)
        i += k
        np.testing.assert_array_equal(W.numpy().ravel(), want)


def one_layer_model(seed=0, n_in=6, n_out=3, density=0.7):
    rng = np.random.default_rng(seed)
    theta = [rng.standard_normal((n_out, n_in)).astype(np.float32)]
    P = [(rng.random((n_out, n_in)) < density).astype(np.float32)]
    X = rng.random((20, n_in)).astype(np.float32)
    y = rng.integers(0, n_out, 20).astype(np.int64)
    return MaskModel(theta, P), X, y, rng


def hand_gradient(theta, P, s, X, y, kind):
    """dL/ds of the mean cross-entropy of a one-layer net W = theta * P * m(s), straight-through dm/ds := 1."""
    m = np.where(s >= 0, 1.0, -1.0 if kind == "sign" else 0.0)
    W = theta.astype(np.float64) * P * m
    z = X.astype(np.float64) @ W.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return (p.T @ X.astype(np.float64)) / len(y) * theta * P


@pytest.mark.parametrize("kind", ["sign", "binary"])
def test_local_training_is_one_adam_step_from_the_broadcast(kind):
    """One epoch of one full batch = one Adam step: s = score_init * v - lr * g / (|g| + eps) (Adam's first step,
    bias-corrected), v the server's broadcast; the returned bits are s >= 0 at the surviving positions."""
    from reprolab.fed.hidenseek import local_train_mask

    model, X, y, rng = one_layer_model()
    v = rng.uniform(-1, 1, model.n_bits).astype(np.float32)  # a mean-of-signs broadcast
    lr, si = 0.5, 1.0
    got, _ = local_train_mask(model, v, X, y, kind, epochs=1, batch_size=len(y), lr=lr, score_init=si, seed=0)
    keep = model.P[0].ravel() > 0
    s0 = np.zeros(model.P[0].size)
    s0[keep] = si * v
    s0 = s0.reshape(model.P[0].shape)
    g = hand_gradient(model.theta[0], model.P[0], s0, X, y, kind)
    s1 = s0 - lr * g / (np.abs(g) + 1e-8)
    assert np.all(np.abs(s1.ravel()[keep]) > 1e-4), "no score on the threshold"
    want = s1.ravel()[keep] >= 0
    np.testing.assert_array_equal(got, want)
    assert 0 < (want != (v >= 0)).sum() < want.size, "some signs flip, not all"
    # the same with a bit broadcast (majority rule): scores restart at +-score_init
    b = rng.random(model.n_bits) > 0.5
    got_b, _ = local_train_mask(model, b, X, y, kind, epochs=1, batch_size=len(y), lr=lr, score_init=si, seed=0)
    s0[:] = 0
    s0.ravel()[keep] = np.where(b, si, -si)
    g = hand_gradient(model.theta[0], model.P[0], s0, X, y, kind)
    np.testing.assert_array_equal(got_b, (s0 - lr * g / (np.abs(g) + 1e-8)).ravel()[keep] >= 0)


def test_local_training_with_a_tiny_step_returns_the_broadcast():
    from reprolab.fed.hidenseek import local_train_mask

    model, X, y, rng = one_layer_model(1)
    for bits in (rng.random(model.n_bits) > 0.5, rng.uniform(-1, 1, model.n_bits).astype(np.float32)):
        got, _ = local_train_mask(model, bits, X, y, "sign", epochs=2, batch_size=7, lr=1e-9, score_init=1.0, seed=3)
        np.testing.assert_array_equal(got, bits if bits.dtype == bool else bits >= 0)


class _Proxy:
    def __init__(self, cid):
        self.cid = cid


@pytest.mark.parametrize("rule", ["mean", "majority"])
def test_strategy_aggregate_fit_against_the_direct_rule_and_ledger(rule):
    """The Flower strategy's aggregate_fit (Tracked + MajorityVote, no Ray): the decoded broadcast equals
    mean_signs / majority_vote of the clients' unpacked bits; each uplink message is the npy header + ceil(n / 8)."""
    from flwr.common import Code, FitRes, Status

    from reprolab.distributed.flower import message_bytes, ndarrays_to_parameters, parameters_to_ndarrays
    from reprolab.fed.hidenseek import _strategy_classes, decode

    _, MaskFed = _strategy_classes()
    rng = np.random.default_rng(7)
    n, K = 1001, 4
    prev = rng.random(n) > 0.5
    strat = MaskFed(num_clients=K, seed=0, n_bits=n, initial_bits=prev, rule=rule,
                    initial_parameters=ndarrays_to_parameters([pack(prev)]))
    bits = [rng.random(n) > 0.5 for _ in range(K)]
    bits[2][:5], bits[3][:5], bits[0][:5], bits[1][:5] = True, False, True, False
    ns = [30, 12, 25, 25]
    ns[0] = ns[1]  # ties on the first 5 positions: 12 - 12 + 25 - 25 = 0
    cids = ["c9", "c3", "c7", "c1"]
    strat.partition_of = {c: k for k, c in enumerate(cids)}
    results = [(_Proxy(cids[k]), FitRes(Status(Code.OK, ""), ndarrays_to_parameters([pack(bits[k])]), ns[k],
                                        {"train_s": 0.1})) for k in (2, 0, 3, 1)]  # arrive out of order
    params, _ = strat.aggregate_fit(1, results, [])
    got = decode(parameters_to_ndarrays(params)[0], n)
    want = mean_signs(bits, ns) if rule == "mean" else majority_vote(bits, ns, prev)
    np.testing.assert_array_equal(got, want)
    if rule == "majority":
        assert got.dtype == bool and np.array_equal(got[:5], prev[:5])
    packed = pack(np.zeros(n, bool))
    header = message_bytes(ndarrays_to_parameters([packed])) - packed.nbytes
    up = [r for r in strat.ledger if r["direction"] == "up"]
    assert [r["partition"] for r in up] == [0, 1, 2, 3]
    assert all(r["bytes"] == header + -(-n // 8) for r in up)
