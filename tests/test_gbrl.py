"""GBRL (arXiv 2407.08250): the tree fitter against a naive exhaustive search and against the gbrl library, the A2C
output gradients against autograd, and the categorical Fetch environment's dynamics."""
import itertools

import numpy as np
import pytest
import torch

from reprolab.rl import gbrl as G


def naive_cosine(G_node_R, G_node_L):
    """The library's cosine score of one node, literally: sum_i g_i . m_side / sqrt(sum_side n_side |m_side|^2)."""
    num, den = 0.0, 0.0
    for side in (G_node_R, G_node_L):
        if len(side):
            m = side.mean(0)
            num += sum(float(g @ m) for g in side)
            den += len(side) * float(m @ m)
    return 0.0 if den == 0 else num / np.sqrt(den)


def naive_oblivious_tree(X, Gr, cat, depth, n_bins=250):
    """Greedy level by level, as the library: at each level, loop over every candidate split not already on the path,
    score it literally (sum over the level's nodes of the naive cosine score, nodes enumerated by their left/right
    codes) and keep the best (first one on ties). Not an exhaustive search over sequences of splits."""
    cands = G.split_candidates(X, cat, n_bins)
    path = []
    for _ in range(depth):
        best, best_j = -np.inf, None
        for j in range(len(cands.feature)):
            if j in path:
                continue
            total = 0.0
            for code in itertools.product([0, 1], repeat=len(path)):
                mask = np.ones(len(X), bool)
                for (jj, b) in zip(path, code):
                    mask &= G.go_right(X, cands.feature[jj], cands.value[jj], cands.categorical[jj]) == b
                r = G.go_right(X, cands.feature[j], cands.value[j], cands.categorical[j])
                total += naive_cosine(Gr[mask & r], Gr[mask & ~r])
            if total > best + 1e-12:
                best, best_j = total, j
        path.append(best_j)
    leaves = {}
    for i in range(len(X)):
        key = tuple(int(G.go_right(X[i:i + 1], cands.feature[j], cands.value[j], cands.categorical[j])[0]) for j in path)
        leaves.setdefault(key, []).append(Gr[i])
    return path, cands, {k: np.mean(v, 0) for k, v in leaves.items()}


@pytest.mark.parametrize("categorical", [False, True])
def test_tree_matches_naive_greedy_search(categorical):
    rng = np.random.default_rng(1)
    X = rng.integers(0, 4, size=(40, 3)).astype(float) if categorical else rng.normal(size=(40, 3))
    Gr = rng.normal(size=(40, 3))
    cat = np.full(3, categorical)
    tree = G.fit_oblivious_tree(X, Gr, cat, max_depth=3, n_bins=8)
    path, cands, leaves = naive_oblivious_tree(X, Gr, cat, 3, n_bins=8)
    assert list(tree.feature) == [int(cands.feature[j]) for j in path]
    assert np.allclose(tree.value, cands.value[path])
    idx = G.leaf_index(X, tree.feature, tree.value, tree.categorical)
    for i in range(len(X)):
        key = tuple((idx[i] >> (2 - d)) & 1 for d in range(3))
        assert np.allclose(tree.leaves[idx[i]], leaves[key])


def test_used_split_excluded_on_a_tie():
    """Two identical binary columns, integer gradients (exact sums): at depth 1 the used split (f0 > 0), its duplicate
    (f1 > 0) and the empty splits (x > 1) all tie; the used one must be skipped and the first unused one taken."""
    rng = np.random.default_rng(5)
    b = rng.integers(0, 2, size=32).astype(float)
    X = np.stack([b, b], axis=1)
    Gr = rng.integers(-3, 4, size=(32, 2)).astype(float)
    Gr[b == 1] += 5.0  # make the first split informative
    cat = np.zeros(2, bool)
    cands = G.split_candidates(X, cat, 250)
    assert list(zip(cands.feature, cands.value)) == [(0, 0.0), (0, 1.0), (1, 0.0), (1, 1.0)]
    tree = G.fit_oblivious_tree(X, Gr, cat, max_depth=2)
    assert list(zip(tree.feature, tree.value)) == [(0, 0.0), (0, 1.0)]  # not (0, 0.0) again
    path, _, _ = naive_oblivious_tree(X, Gr, cat, 2)
    assert path == [0, 1]
    # all three unused candidates tie at depth 1: the score is exactly the unsplit one
    node = G.go_right(X, 0, 0.0, False).astype(np.int64)
    right = G.go_right(X, cands.feature, cands.value[None], cands.categorical[None]).T
    sc = G.cosine_level_scores(right, node, 2, Gr)
    assert sc[0] == sc[1] == sc[2] == sc[3]


def test_gae_matches_sb3_rollout_buffer():
    """Advantages and returns of train_tree_a2c's GAE against stable-baselines3's RolloutBuffer on a fixed batch with
    episode starts and dones inside and at the end of the rollout."""
    from gymnasium import spaces
    from stable_baselines3.common.buffers import RolloutBuffer

    rng = np.random.default_rng(7)
    T, n_env, gamma, lam = 6, 3, 0.97, 0.9
    R, V = rng.normal(size=(T, n_env)), rng.normal(size=(T, n_env))
    start = (rng.random((T, n_env)) < 0.3).astype(float)
    start[0] = 1.0
    last_v, last_start = rng.normal(size=n_env), np.array([1.0, 0.0, 1.0])
    buf = RolloutBuffer(T, spaces.Box(-1, 1, (2,)), spaces.Discrete(2), device="cpu", gamma=gamma, gae_lambda=lam,
                        n_envs=n_env)
    for t in range(T):
        buf.add(np.zeros((n_env, 2), np.float32), np.zeros((n_env, 1)), R[t], start[t],
                torch.tensor(V[t]), torch.zeros(n_env))
    buf.compute_returns_and_advantage(torch.tensor(last_v), last_start)
    adv, ret = G.gae_returns(R, V, start, last_v, last_start, gamma, lam)
    assert np.allclose(adv, buf.advantages, atol=1e-5)
    assert np.allclose(ret, buf.returns, atol=1e-5)


def test_quantile_candidates_all_unique_values_of_a_small_batch():
    x = np.array([3.0, 1.0, 2.0, 2.0, 5.0])
    assert list(G.quantile_candidates(x, 250)) == [1.0, 2.0, 3.0, 5.0]
    # 2 bins on 9 samples: 3 equal-count bins, the last value of the first two
    assert list(G.quantile_candidates(np.arange(9.0), 2)) == [2.0, 5.0]


@pytest.mark.parametrize("categorical", [False, True])
def test_boosting_steps_equal_gbrl_library(categorical):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 5, size=(96, 5)).astype(float) if categorical else rng.normal(size=(96, 4))
    cat = np.full(X.shape[1], categorical)
    ours = G.TreeActorCritic(2, cat, 0.13, 0.05)
    lib = G.GbrlLibraryActorCritic(2, cat, 0.13, 0.05)
    for _ in range(3):
        Gr = rng.normal(size=(96, 3))
        ours.step(X, Gr[:, :2], Gr[:, 2])
        lib.step(X, Gr[:, :2], Gr[:, 2])
        for a, b in zip(ours.predict(X), lib.predict(X)):
            assert np.abs(a - b).max() < 1e-5
    Xt = rng.integers(0, 5, size=(50, 5)).astype(float) if categorical else rng.normal(size=(50, 4))
    for a, b in zip(ours.predict(Xt), lib.predict(Xt)):  # also off the training batch
        assert np.abs(a - b).max() < 1e-5


def test_a2c_output_grads_match_autograd():
    rng = np.random.default_rng(2)
    n, A = 12, 3
    theta, v = rng.normal(size=(n, A)), rng.normal(size=n)
    actions, adv, ret = rng.integers(0, A, n), rng.normal(size=n), rng.normal(size=n)
    ent, vf = 0.05, 0.5
    t = torch.tensor(theta, requires_grad=True)
    vv = torch.tensor(v, requires_grad=True)
    dist = torch.distributions.Categorical(logits=t)
    loss = (-(torch.tensor(adv) * dist.log_prob(torch.tensor(actions))).mean() - ent * dist.entropy().mean()
            + vf * torch.nn.functional.mse_loss(torch.tensor(ret), vv))
    loss.backward()
    g_theta, g_v = G.a2c_output_grads(theta, v, actions, adv, ret, ent, vf)
    assert np.allclose(g_theta, t.grad.numpy() * n, atol=1e-10)  # the library's grad * n_samples convention
    assert np.allclose(g_v, vv.grad.numpy() * n, atol=1e-10)


def test_fetch_dynamics():
    env = G.CategoricalFetch(size=3, n_objects=2, view=3, max_steps=20)
    obs, _ = env.reset(seed=3)
    assert obs.shape == (10,) and env.observation_space.contains(obs)
    assert obs[4] == G.TOKEN_ID["empty"]  # the agent's own cell
    assert G.TOKENS[obs[-1]].split("_")[0] in G.OBJECTS
    # walls all around a 3x3 room: from a corner two neighbours are walls
    env.grid[1:-1, 1:-1] = G.TOKEN_ID["empty"]
    env.pos = np.array([1, 1])
    o = env._obs()
    assert o[1] == G.TOKEN_ID["wall"] and o[3] == G.TOKEN_ID["wall"] and o[0] == G.TOKEN_ID["wall"]
    # moving into a wall leaves the agent in place
    o, r, term, trunc, _ = env.step(0)
    assert (env.pos == [1, 1]).all() and r == 0 and not term
    # stepping onto the mission object: reward 1 - 0.9 t / max_steps, episode ends
    env.grid[1, 2] = env.mission
    o, r, term, trunc, _ = env.step(3)
    assert term and r == pytest.approx(1 - 0.9 * 2 / 20)
    # a wrong object ends the episode with 0
    env.reset(seed=4)
    env.grid[1:-1, 1:-1] = G.TOKEN_ID["empty"]
    other = [t for t in range(3, len(G.TOKENS)) if t != env.mission][0]
    env.pos = np.array([2, 2])
    env.grid[3, 2] = other
    _, r, term, _, _ = env.step(1)
    assert term and r == 0.0
    # truncation after max_steps
    env.reset(seed=5)
    env.grid[1:-1, 1:-1] = G.TOKEN_ID["empty"]
    for k in range(20):
        _, _, term, trunc, _ = env.step(k % 2)
    assert trunc and not term
    # one-hot view for the MLP: one 1 per feature
    oh = G.OneHot(G.CategoricalFetch(view=3)).observation(obs)
    assert oh.sum() == 10 and oh.shape == (10 * len(G.TOKENS),)

