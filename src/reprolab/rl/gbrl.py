"""Gradient Boosting Reinforcement Learning (GBRL), Fuhrer, Tessler, Dalal (NVIDIA), arXiv:2407.08250.

https://arxiv.org/abs/2407.08250 ; official code: NVlabs/gbrl (the C++/Python library, v1.1.9 here) and NVlabs/gbrl_sb3
(the A2C/PPO wrappers and the paper's hyper-parameters).

An actor-critic whose outputs are gradient-boosted tree ensembles. Both heads share one tree per update ("shared tree
structure"): the tree is fitted to the per-sample gradients of the A2C loss with respect to the model's *outputs*
(policy logits theta and value V), concatenated as G = [dL/dtheta, dL/dV] (n, A+1); each leaf holds the mean of G over
its samples, and the ensemble takes a functional SGD step

    theta(x) <- theta(x) - policy_lr * leaf(x)[:A]        V(x) <- V(x) - value_lr * leaf(x)[A]

(gbrl src/cpp/fitter.cpp calc_leaf_value; optimizer.cpp SGDOptimizer::step). The tree is *oblivious* (one split per
depth, shared by every node of that depth; gbrl_sb3 config/defaults.yaml tree_struct: max_depth 4, grow_policy
oblivious, n_bins 250, min_data_in_leaf 0), its split candidates are quantiles of the batch (numerical features,
split_candidate_generator.cpp computeQuantiles) or the categories seen in the batch (categorical features, split
"x == c"), and a candidate's score is the library's cosine score summed over the nodes of the level
(math_ops.h:538 cosine_score):

    score(node) = (sum_{i in R} g_i . m_R + sum_{i in L} g_i . m_L) / sqrt(n_R |m_R|^2 + n_L |m_L|^2)

with m_R, m_L the mean gradients of the two sides (0 when a side or node is empty). A candidate already used on the
path scores -inf (node.cpp:151 getSplitScore). The gradients follow the library's convention ``grad(mean loss) * n``
(models/actor_critic.py step), i.e. per-sample gradients of the per-sample loss.

Also here: a small categorical gridworld (``CategoricalFetch``, MiniGrid-Fetch-like; generated, not the paper's
MiniGrid), the A2C rollout loop with the trees (``train_tree_a2c``; backend ``ours`` or the gbrl library's
``ActorCritic`` fed the same gradients), the stable-baselines3 A2C MLP baseline and a common evaluation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
from gymnasium import spaces

# ------------------------------------------------------------------------------------------------------------------
# Categorical gridworld (generated): a MiniGrid-Fetch-5x5-N2-like task with categorical observations
# ------------------------------------------------------------------------------------------------------------------
OBJECTS = ("ball", "key")
COLORS = ("red", "green", "blue")
TOKENS = ("void", "wall", "empty") + tuple(f"{o}_{c}" for o in OBJECTS for c in COLORS)
TOKEN_ID = {t: i for i, t in enumerate(TOKENS)}
MOVES = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]])  # up, down, left, right (row, col)


class CategoricalFetch(gym.Env):
    """Fetch the object named by the mission in a walled room (generated; MiniGrid-Fetch-5x5-N2-like).

    The room has ``size`` x ``size`` free cells inside a wall; ``n_objects`` distinct objects (type x colour) and the
    agent are placed uniformly at random, and the mission names one of the objects. Actions move the agent one cell
    (up, down, left, right); moving into a wall leaves it in place; moving onto an object picks it up and ends the
    episode with reward ``1 - 0.9 t / max_steps`` (MiniGrid's ``_reward``) if it is the mission's object, else 0.
    After ``max_steps`` steps the episode is truncated with reward 0.

    Observation: categorical, ``view`` x ``view`` cells of the egocentric window centred on the agent (token ids of
    TOKENS: void outside the grid, wall, empty or an object) followed by the mission's token id; int64 of length
    view**2 + 1. With view >= 2 size - 1 the whole room is always in view (fully observed).
    """

    metadata = {"render_modes": []}

    def __init__(self, size: int = 3, n_objects: int = 2, view: int = 5, max_steps: int = 20):
        self.size, self.n_objects, self.view, self.max_steps = size, n_objects, view, max_steps
        self.n_features = view * view + 1
        self.observation_space = spaces.MultiDiscrete([len(TOKENS)] * self.n_features)
        self.action_space = spaces.Discrete(4)
        self._rng = np.random.default_rng()

    def reset(self, *, seed: int | None = None, options=None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        n = self.size + 2
        self.grid = np.full((n, n), TOKEN_ID["empty"], dtype=np.int64)
        self.grid[0, :] = self.grid[-1, :] = self.grid[:, 0] = self.grid[:, -1] = TOKEN_ID["wall"]
        cells = [(r, c) for r in range(1, n - 1) for c in range(1, n - 1)]
        pick = self._rng.choice(len(cells), size=self.n_objects + 1, replace=False)
        objs = self._rng.choice(len(TOKENS) - 3, size=self.n_objects, replace=False) + 3
        for k, o in zip(pick[1:], objs):
            self.grid[cells[k]] = o
        self.pos = np.array(cells[pick[0]])
        self.mission = int(objs[self._rng.integers(self.n_objects)])
        self.t = 0
        return self._obs(), {}

    def _obs(self) -> np.ndarray:
        h = self.view // 2
        n = self.grid.shape[0]
        out = np.full((self.view, self.view), TOKEN_ID["void"], dtype=np.int64)
        r0, c0 = self.pos - h
        for i in range(self.view):
            for j in range(self.view):
                r, c = r0 + i, c0 + j
                if 0 <= r < n and 0 <= c < n:
                    out[i, j] = self.grid[r, c]
        return np.concatenate([out.ravel(), [self.mission]])

    def step(self, action):
        self.t += 1
        nxt = self.pos + MOVES[int(action)]
        cell = self.grid[tuple(nxt)]
        reward, terminated = 0.0, False
        if cell != TOKEN_ID["wall"]:
            self.pos = nxt
            if cell >= 3:  # an object: picked up, the episode ends
                terminated = True
                reward = 1.0 - 0.9 * self.t / self.max_steps if cell == self.mission else 0.0
                self.grid[tuple(nxt)] = TOKEN_ID["empty"]
        truncated = (not terminated) and self.t >= self.max_steps
        return self._obs(), reward, terminated, truncated, {}


class OneHot(gym.ObservationWrapper):
    """One-hot encoding of a MultiDiscrete observation (the MLP baseline's input)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.nvec = np.asarray(env.observation_space.nvec)
        self.offsets = np.concatenate([[0], np.cumsum(self.nvec)[:-1]])
        self.observation_space = spaces.Box(0.0, 1.0, shape=(int(self.nvec.sum()),), dtype=np.float32)

    def observation(self, obs):
        out = np.zeros(self.observation_space.shape, dtype=np.float32)
        out[self.offsets + np.asarray(obs)] = 1.0
        return out


def make_env(name: str, env_kwargs: dict | None = None, one_hot: bool = False) -> gym.Env:
    """CartPole-v1 (or any registered gymnasium id), or ``categorical_fetch`` (one-hot for the MLP if asked)."""
    if name == "categorical_fetch":
        env = CategoricalFetch(**(env_kwargs or {}))
        return OneHot(env) if one_hot else env
    return gym.make(name)


def is_categorical(name: str) -> bool:
    return name == "categorical_fetch"


# ------------------------------------------------------------------------------------------------------------------
# A2C loss and its gradient with respect to the outputs (theta logits, V)
# ------------------------------------------------------------------------------------------------------------------
def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def a2c_output_grads(theta: np.ndarray, values: np.ndarray, actions: np.ndarray, advantages: np.ndarray,
                     returns: np.ndarray, ent_coef: float, vf_coef: float) -> tuple[np.ndarray, np.ndarray]:
    """n x d(mean A2C loss)/d(outputs): the library's ``params.grad * n_samples`` (gbrl models/actor_critic.py step).

    L = -mean(A_i log pi(a_i|x_i)) - ent_coef mean(H(pi(.|x_i))) + vf_coef mean((R_i - V_i)^2)   (gbrl_sb3 algos/a2c.py)
    d/dtheta_i: -A_i (onehot(a_i) - p_i) + ent_coef p_i (log p_i + H_i);  d/dV_i: 2 vf_coef (V_i - R_i).
    theta (n, A), values (n,), actions (n,) int, advantages/returns (n,).
    """
    p = softmax(theta)  # (n, A)
    logp = np.log(np.clip(p, 1e-30, None))
    H = -(p * logp).sum(axis=1, keepdims=True)  # (n, 1)
    onehot = np.eye(theta.shape[1])[actions]
    g_theta = -advantages[:, None] * (onehot - p) + ent_coef * p * (logp + H)
    g_v = 2.0 * vf_coef * (values - returns)
    return g_theta, g_v


# ------------------------------------------------------------------------------------------------------------------
# Oblivious tree fitted to output gradients (the gbrl CPU fitter, re-implemented)
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Candidates:
    feature: np.ndarray  # (C,) int
    value: np.ndarray  # (C,) float threshold (numerical: x > value) or category id (categorical: x == value)
    categorical: np.ndarray  # (C,) bool


def quantile_candidates(x: np.ndarray, n_bins: int) -> np.ndarray:
    """gbrl computeQuantiles for one numerical column: n_bins + 1 equal-count bins of the sorted batch, the value at
    each bin's last sample, consecutive duplicates dropped (split_candidate_generator.cpp:229-262)."""
    n = len(x)
    xs = np.sort(x, kind="stable")
    actual = n_bins + 1
    counts = np.full(actual, n // actual)
    counts[: n % actual] += 1
    cum = np.cumsum(counts[:n_bins])
    out = []
    for c in cum:
        v = xs[c - 1] if c > 0 else None
        if v is None:
            continue
        if not out or out[-1] != v:
            out.append(v)
    return np.asarray(out, dtype=float)


def split_candidates(X: np.ndarray, categorical: np.ndarray, n_bins: int) -> Candidates:
    """Numerical candidates first (feature by feature), then categorical ones (every category seen in the batch,
    capped at n_bins per feature; the library keeps the top n_cat_features * n_bins by mean gradient norm)."""
    feats, vals, cats = [], [], []
    for j in np.flatnonzero(~categorical):
        q = quantile_candidates(X[:, j], n_bins)
        feats += [j] * len(q)
        vals += list(q)
        cats += [False] * len(q)
    for j in np.flatnonzero(categorical):
        u = np.unique(X[:, j])[:n_bins]
        feats += [j] * len(u)
        vals += list(u.astype(float))
        cats += [True] * len(u)
    return Candidates(np.asarray(feats, dtype=np.int64), np.asarray(vals, dtype=float), np.asarray(cats, dtype=bool))


def go_right(X: np.ndarray, feature, value, categorical) -> np.ndarray:
    """The split's test: x_f > v (numerical) or x_f == v (categorical). Broadcasts over candidates."""
    x = X[:, feature]
    return np.where(categorical, x == value, x > value)


def cosine_level_scores(right: np.ndarray, node: np.ndarray, n_nodes: int, G: np.ndarray) -> np.ndarray:
    """Score of every candidate at one level of an oblivious tree: the sum over nodes of the library's cosine score.

    right (C, n) bool, node (n,) int in [0, n_nodes), G (n, k). Returns (C,). For one node the cosine score
    sum_i g_i . m_side / sqrt(sum_side n_side |m_side|^2) equals sqrt(|S_R|^2 / n_R + |S_L|^2 / n_L) (S = gradient
    sums), which is what is computed here; 0 for an empty node or a node with zero gradients.
    """
    onehot = np.eye(n_nodes)[node]  # (n, N)
    Rf = right.astype(float)
    S_R = np.einsum("cn,nN,nk->cNk", Rf, onehot, G)  # (C, N, k)
    n_R = Rf @ onehot  # (C, N)
    S_tot = onehot.T @ G  # (N, k)
    n_tot = onehot.sum(axis=0)  # (N,)
    S_L, n_L = S_tot[None] - S_R, n_tot[None] - n_R
    with np.errstate(divide="ignore", invalid="ignore"):
        den = np.where(n_R > 0, (S_R ** 2).sum(-1) / n_R, 0.0) + np.where(n_L > 0, (S_L ** 2).sum(-1) / n_L, 0.0)
    return np.sqrt(np.maximum(den, 0.0)).sum(axis=1)


@dataclass
class ObliviousTree:
    feature: np.ndarray  # (D,)
    value: np.ndarray  # (D,)
    categorical: np.ndarray  # (D,)
    leaves: np.ndarray  # (2**D, k): mean gradient per leaf


def leaf_index(X: np.ndarray, feature, value, categorical) -> np.ndarray:
    """Leaf of every sample (n,) for one tree; bit d (from the top) set when the sample went right at depth d."""
    idx = np.zeros(len(X), dtype=np.int64)
    for f, v, c in zip(feature, value, categorical):
        idx = 2 * idx + go_right(X, f, v, c)
    return idx


def fit_oblivious_tree(X: np.ndarray, G: np.ndarray, categorical: np.ndarray, max_depth: int = 4, n_bins: int = 250,
                       min_data_in_leaf: int = 0) -> ObliviousTree:
    """One gbrl oblivious tree on the batch X (n, d) with gradients G (n, k) (fitter.cpp fit_oblivious_tree).

    At each depth the candidate with the largest summed cosine score (first one on ties) splits every node; a candidate
    already on the path, or one leaving a side with fewer than min_data_in_leaf samples, is excluded. Leaves hold the
    mean raw gradient of their samples (0 if empty).
    """
    cand = split_candidates(X, categorical, n_bins)
    right_all = go_right(X, cand.feature, cand.value[None], cand.categorical[None]).T  # (C, n)
    node = np.zeros(len(X), dtype=np.int64)
    used = np.zeros(len(cand.feature), dtype=bool)
    chosen = []
    for depth in range(max_depth):
        if len(cand.feature) == 0:
            break
        N = 2 ** depth
        score = cosine_level_scores(right_all, node, N, G)
        if min_data_in_leaf > 0:
            onehot = np.eye(N)[node]
            n_R = right_all.astype(float) @ onehot
            n_L = onehot.sum(0)[None] - n_R
            score = np.where((n_R < min_data_in_leaf).any(1) | (n_L < min_data_in_leaf).any(1), -np.inf, score)
        score = np.where(used, -np.inf, score)
        if not np.isfinite(score).any():
            break
        j = int(np.argmax(score))
        used[j] = True
        chosen.append(j)
        node = 2 * node + right_all[j]
    feature, value, catg = cand.feature[chosen], cand.value[chosen], cand.categorical[chosen]
    n_leaves = 2 ** len(chosen)
    onehot = np.eye(n_leaves)[node]
    counts = onehot.sum(0)
    leaves = np.divide(onehot.T @ G, counts[:, None], out=np.zeros((n_leaves, G.shape[1])), where=counts[:, None] > 0)
    return ObliviousTree(feature, value, catg, leaves)


@dataclass
class TreeActorCritic:
    """theta(x), V(x) = bias - sum_t lr * leaf_t(x), one shared oblivious tree per boosting step."""

    n_actions: int
    categorical: np.ndarray
    policy_lr: float
    value_lr: float
    max_depth: int = 4
    n_bins: int = 250
    min_data_in_leaf: int = 0
    trees: list = field(default_factory=list)

    def __post_init__(self):
        D = self.max_depth
        self._feat = np.zeros((0, D), dtype=np.int64)
        self._val = np.zeros((0, D))
        self._cat = np.zeros((0, D), dtype=bool)
        self._leaves = np.zeros((0, 2 ** D, self.n_actions + 1))
        self.lr = np.array([self.policy_lr] * self.n_actions + [self.value_lr])

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X = np.asarray(X, dtype=float)
        out = np.zeros((len(X), self.n_actions + 1))
        if len(self.trees):
            idx = np.zeros((len(X), len(self.trees)), dtype=np.int64)
            for d in range(self.max_depth):
                x = X[:, self._feat[:, d]]  # (n, T)
                r = np.where(self._cat[:, d], x == self._val[:, d], x > self._val[:, d])
                idx = 2 * idx + r
            out -= self._leaves[np.arange(len(self.trees))[None], idx].sum(axis=1)  # (n, k), lr already applied
        return out[:, :-1], out[:, -1]

    def step(self, X: np.ndarray, g_theta: np.ndarray, g_v: np.ndarray) -> ObliviousTree:
        G = np.concatenate([g_theta, g_v[:, None]], axis=1)
        tree = fit_oblivious_tree(np.asarray(X, dtype=float), G, self.categorical, self.max_depth, self.n_bins,
                                  self.min_data_in_leaf)
        self.trees.append(tree)
        D, d = self.max_depth, len(tree.feature)
        # pad a shallower tree with never-true numerical splits (x > +inf): its leaves are repeated on the left
        feat = np.concatenate([tree.feature, np.zeros(D - d, dtype=np.int64)])
        val = np.concatenate([tree.value, np.full(D - d, np.inf)])
        cat = np.concatenate([tree.categorical, np.zeros(D - d, dtype=bool)])
        leaves = tree.leaves[np.arange(2 ** D) >> (D - d)] * self.lr
        self._feat = np.vstack([self._feat, feat[None]])
        self._val = np.vstack([self._val, val[None]])
        self._cat = np.vstack([self._cat, cat[None]])
        self._leaves = np.concatenate([self._leaves, leaves[None]])
        return tree


class GbrlLibraryActorCritic:
    """The gbrl library's ActorCritic (shared oblivious trees, cosine score, SGD) behind the same interface.

    par_th (the minimum number of samples before the library parallelizes on CPU; 2 in the first quick run) is set so
    high that it always runs single-threaded: the outputs are the same, and the threads' overhead on a busy 2-core
    machine made a 128-sample predict about 10x more CPU-expensive."""

    def __init__(self, n_actions: int, categorical: np.ndarray, policy_lr: float, value_lr: float, max_depth: int = 4,
                 n_bins: int = 250, min_data_in_leaf: int = 0):
        from gbrl.models.actor_critic import ActorCritic

        self.n_actions, self.categorical = n_actions, np.asarray(categorical)
        self.model = ActorCritic(
            tree_struct=dict(max_depth=max_depth, grow_policy="oblivious", n_bins=n_bins,
                             min_data_in_leaf=min_data_in_leaf, par_th=10**7),  # single-threaded (see below)
            input_dim=len(categorical), output_dim=n_actions + 1,
            policy_optimizer=dict(policy_algo="SGD", policy_lr=policy_lr, start_idx=0, stop_idx=n_actions),
            value_optimizer=dict(value_algo="SGD", value_lr=value_lr, start_idx=n_actions, stop_idx=n_actions + 1),
            shared_tree_struct=True,
            params=dict(split_score_func="cosine", generator_type="Quantile", control_variates=False), device="cpu")
        self.n_steps = 0

    def _inputs(self, X):
        X = np.asarray(X)
        if not self.categorical.any():
            return X.astype(np.float32)
        out = np.empty(X.shape, dtype=object)
        for j in range(X.shape[1]):
            out[:, j] = [f"c{int(v)}" for v in X[:, j]] if self.categorical[j] else X[:, j].astype(np.float32)
        return out

    def predict(self, X):
        if self.n_steps == 0:
            return np.zeros((len(X), self.n_actions)), np.zeros(len(X))
        theta, v = self.model(self._inputs(X), requires_grad=False, tensor=False)
        return np.asarray(theta, dtype=float).reshape(len(X), -1), np.asarray(v, dtype=float).reshape(-1)

    def step(self, X, g_theta, g_v):
        self.model.step(self._inputs(X), policy_grads=g_theta.astype(np.float32),
                        value_grads=g_v.reshape(-1, 1).astype(np.float32))
        self.n_steps += 1


# ------------------------------------------------------------------------------------------------------------------
# A2C with trees: rollouts over n_envs copies, GAE, one boosting step per rollout (gbrl_sb3 algos/a2c.py)
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    curve_steps: list
    curve_returns: list
    eval_return: float
    seconds: float
    n_trees: int = 0


def evaluate(act, env_name: str, env_kwargs: dict | None, n_episodes: int, seed: int, one_hot: bool = False) -> float:
    """Mean undiscounted return of the policy ``act(obs (1, d)) -> action`` on n_episodes fixed env seeds."""
    env = make_env(env_name, env_kwargs, one_hot)
    total = 0.0
    for ep in range(n_episodes):
        obs, _ = env.reset(seed=10_000 + 1000 * seed + ep)
        done = False
        while not done:
            obs, r, term, trunc, _ = env.step(act(np.asarray(obs)[None]))
            total += r
            done = term or trunc
    return total / n_episodes


def random_return(env_name: str, env_kwargs: dict | None, n_episodes: int, seed: int) -> float:
    env = make_env(env_name, env_kwargs)
    rng = np.random.default_rng(seed)
    return evaluate(lambda o: int(rng.integers(env.action_space.n)), env_name, env_kwargs, n_episodes, seed)


def gae_returns(R: np.ndarray, V: np.ndarray, start: np.ndarray, last_v: np.ndarray, last_start: np.ndarray,
                gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """GAE(lambda) advantages and returns (advantage + value) of a (T, n_envs) rollout, as stable-baselines3's
    RolloutBuffer.compute_returns_and_advantage: start[t] = 1 where obs t begins an episode (SB3 episode_starts),
    last_v = V(obs after the rollout), last_start = 1 where the rollout's last step ended an episode (SB3 dones)."""
    T = len(R)
    adv = np.zeros_like(np.asarray(R, dtype=float))
    gae = np.zeros(R.shape[1])
    for t in reversed(range(T)):
        nonterminal = 1.0 - (last_start if t == T - 1 else start[t + 1])
        next_v = last_v if t == T - 1 else V[t + 1]
        delta = R[t] + gamma * next_v * nonterminal - V[t]
        gae = delta + gamma * lam * nonterminal * gae
        adv[t] = gae
    return adv, adv + V


def train_tree_a2c(env_name: str, env_kwargs: dict | None, total_steps: int, seed: int, hp: dict,
                   backend: str = "ours", n_eval: int = 10, deterministic: bool = False) -> RunResult:
    """A2C with a tree actor-critic (gbrl_sb3 A2C_GBRL: normalized advantages, one tree per rollout).

    hp: n_envs, n_steps, gamma, gae_lambda, ent_coef, vf_coef, policy_lr, value_lr, max_depth, n_bins.
    Truncated episodes bootstrap with gamma V(final obs), as stable-baselines3 does.
    """
    t0 = time.process_time()
    rng = np.random.default_rng(seed)
    envs = [make_env(env_name, env_kwargs) for _ in range(hp["n_envs"])]
    n_act = envs[0].action_space.n
    cat = np.full(envs[0].observation_space.shape[0], is_categorical(env_name))
    cls = TreeActorCritic if backend == "ours" else GbrlLibraryActorCritic
    model = cls(n_act, cat, hp["policy_lr"], hp["value_lr"], max_depth=hp["max_depth"], n_bins=hp["n_bins"])
    obs = np.stack([e.reset(seed=1000 * seed + i)[0] for i, e in enumerate(envs)]).astype(float)
    ep_ret = np.zeros(len(envs))
    curve_steps, curve_returns = [], []
    steps, n_env, T = 0, len(envs), hp["n_steps"]
    while steps < total_steps:
        O = np.zeros((T, n_env, obs.shape[1]))
        A = np.zeros((T, n_env), dtype=np.int64)
        R = np.zeros((T, n_env))
        V = np.zeros((T, n_env))
        start = np.zeros((T, n_env))  # 1 where the observation starts a new episode (after a done)
        episode_start = np.ones(n_env) if steps == 0 else last_start
        for t in range(T):
            theta, v = model.predict(obs)
            p = softmax(theta)
            a = (p.cumsum(1) > rng.random((n_env, 1))).argmax(1)
            O[t], A[t], V[t], start[t] = obs, a, v, episode_start
            new_obs = np.zeros_like(obs)
            episode_start = np.zeros(n_env)
            for i, e in enumerate(envs):
                o, r, term, trunc, _ = e.step(int(a[i]))
                ep_ret[i] += r
                if trunc and not term:  # bootstrap the truncated episode with the value of its last observation
                    r += hp["gamma"] * model.predict(np.asarray(o, dtype=float)[None])[1][0]
                R[t, i] = r
                if term or trunc:
                    curve_steps.append(steps + (t + 1) * n_env)
                    curve_returns.append(float(ep_ret[i]))
                    ep_ret[i] = 0.0
                    o, _ = e.reset()
                    episode_start[i] = 1.0
                new_obs[i] = o
            obs = new_obs
        last_start = episode_start
        steps += T * n_env
        adv, ret = gae_returns(R, V, start, model.predict(obs)[1], episode_start, hp["gamma"], hp["gae_lambda"])
        X = O.reshape(T * n_env, -1)
        a_flat, adv_flat, ret_flat = A.ravel(), adv.ravel(), ret.ravel()
        theta, v = model.predict(X)
        adv_n = (adv_flat - adv_flat.mean()) / (adv_flat.std(ddof=1) + 1e-8) if hp.get("normalize_advantage", True) \
            else adv_flat
        g_theta, g_v = a2c_output_grads(theta, v, a_flat, adv_n, ret_flat, hp["ent_coef"], hp["vf_coef"])
        model.step(X, g_theta, g_v)

    eval_rng = np.random.default_rng(10_000 + seed)

    def act(o):
        p = softmax(model.predict(np.asarray(o, dtype=float))[0])[0]
        return int(np.argmax(p)) if deterministic else int((p.cumsum() > eval_rng.random()).argmax())

    ev = evaluate(act, env_name, env_kwargs, n_eval, seed)
    n_trees = len(model.trees) if backend == "ours" else model.n_steps
    return RunResult(curve_steps, curve_returns, ev, time.process_time() - t0, n_trees)


def train_sb3_a2c(env_name: str, env_kwargs: dict | None, total_steps: int, seed: int, hp: dict,
                  n_eval: int = 10, deterministic: bool = False) -> RunResult:
    """stable-baselines3 A2C with an MLP policy (rl-zoo hyper-parameters: n_envs, ent_coef; SB3 defaults otherwise)."""
    import torch
    from stable_baselines3 import A2C
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    t0 = time.process_time()
    one_hot = is_categorical(env_name)
    venv = make_vec_env(lambda: make_env(env_name, env_kwargs, one_hot), n_envs=hp["n_envs"], seed=1000 * seed)

    class Curve(BaseCallback):
        def __init__(self):
            super().__init__()
            self.steps, self.rets = [], []

        def _on_step(self):
            for info in self.locals["infos"]:
                if "episode" in info:
                    self.steps.append(self.num_timesteps)
                    self.rets.append(float(info["episode"]["r"]))
            return True

    kw = {k: v for k, v in hp.items() if k != "n_envs"}
    if "policy_kwargs" in kw:
        kw["policy_kwargs"] = dict(kw["policy_kwargs"])
    model = A2C("MlpPolicy", venv, seed=seed, device="cpu", verbose=0, **kw)
    cb = Curve()
    model.learn(total_steps, callback=cb)

    torch.manual_seed(10_000 + seed)

    def act(o):
        with torch.no_grad():
            return int(model.predict(o, deterministic=deterministic)[0][0])

    ev = evaluate(act, env_name, env_kwargs, n_eval, seed, one_hot=one_hot)
    return RunResult(cb.steps, cb.rets, ev, time.process_time() - t0)


def smooth_curve(steps: list, returns: list, grid: np.ndarray, window: int = 20) -> np.ndarray:
    """Mean return of the last ``window`` episodes finished by each grid step (nan before the first)."""
    steps, returns = np.asarray(steps), np.asarray(returns)
    out = np.full(len(grid), np.nan)
    for k, g in enumerate(grid):
        r = returns[steps <= g][-window:]
        if len(r):
            out[k] = r.mean()
    return out


# ------------------------------------------------------------------------------------------------------------------
# Configuration helpers and the side-by-side check against the gbrl library
# ------------------------------------------------------------------------------------------------------------------
ENV_IDS = {"cartpole": "CartPole-v1", "fetch": "categorical_fetch"}
TREE_KEYS = ("n_envs", "n_steps", "gamma", "gae_lambda", "ent_coef", "vf_coef", "policy_lr", "value_lr")
NN_KEYS = ("n_envs", "n_steps", "gamma", "gae_lambda", "ent_coef", "learning_rate", "max_grad_norm", "use_rms_prop")


def n_eval(cfg: dict, env: str) -> int:
    return cfg[f"{env}_n_eval"]


def env_spec(cfg: dict, env: str) -> tuple[str, dict | None, int]:
    """(gymnasium id or 'categorical_fetch', env kwargs, env steps per run) of a params.yaml env name."""
    if env == "fetch":
        kw = dict(size=cfg["fetch_size"], n_objects=cfg["fetch_objects"], view=cfg["fetch_view"],
                  max_steps=cfg["fetch_max_steps"])
        return ENV_IDS[env], kw, cfg["fetch_steps"]
    return ENV_IDS[env], None, cfg["cartpole_steps"]


def tree_hp(cfg: dict, env: str) -> dict:
    return {**{k: cfg[f"{env}_tree_{k}"] for k in TREE_KEYS}, "max_depth": cfg["max_depth"], "n_bins": cfg["n_bins"],
            "normalize_advantage": True}


def nn_hp(cfg: dict, env: str) -> dict:
    return {k: cfg[f"{env}_nn_{k}"] for k in NN_KEYS}


def rollout_batch(env_name: str, env_kwargs: dict | None, n_envs: int, n_steps: int, seed: int) -> tuple:
    """Observations, actions and discounted returns of a uniform-random rollout (n_envs x n_steps rows)."""
    rng = np.random.default_rng(seed)
    envs = [make_env(env_name, env_kwargs) for _ in range(n_envs)]
    obs = [e.reset(seed=seed * 100 + i)[0] for i, e in enumerate(envs)]
    X, A, Rw = [], [], []
    for _ in range(n_steps):
        for i, e in enumerate(envs):
            a = int(rng.integers(e.action_space.n))
            X.append(np.asarray(obs[i], dtype=float))
            A.append(a)
            o, r, term, trunc, _ = e.step(a)
            Rw.append(r)
            obs[i] = e.reset()[0] if (term or trunc) else o
    return np.stack(X), np.asarray(A), np.asarray(Rw, dtype=float), envs[0].action_space.n


def peer_check(env_name: str, env_kwargs: dict | None, hp: dict, n_boost: int, seed: int) -> dict:
    """n_boost boosting steps of our fitter and of gbrl's ActorCritic on the same real rollout batches and the same
    A2C output gradients (computed from our model's outputs); the largest |difference| of their outputs."""
    X, A, Rw, n_act = rollout_batch(env_name, env_kwargs, hp["n_envs"], hp["n_steps"], seed)
    cat = np.full(X.shape[1], is_categorical(env_name))
    ours = TreeActorCritic(n_act, cat, hp["policy_lr"], hp["value_lr"], hp["max_depth"], hp["n_bins"])
    lib = GbrlLibraryActorCritic(n_act, cat, hp["policy_lr"], hp["value_lr"], hp["max_depth"], hp["n_bins"])
    rng = np.random.default_rng(seed)
    errs = []
    for k in range(n_boost):
        theta, v = ours.predict(X)
        adv = Rw - v + 0.1 * rng.standard_normal(len(X))  # a stand-in advantage; any gradient works for the check
        adv = (adv - adv.mean()) / (adv.std(ddof=1) + 1e-8)
        g_theta, g_v = a2c_output_grads(theta, v, A, adv, Rw, hp["ent_coef"] + 0.01, hp["vf_coef"])
        ours.step(X, g_theta, g_v)
        lib.step(X, g_theta, g_v)
        (t1, v1), (t2, v2) = ours.predict(X), lib.predict(X)
        errs.append(float(max(np.abs(t1 - t2).max(), np.abs(v1 - v2).max())))
    t1, _ = ours.predict(X)
    return {"max_abs_diff": max(errs), "per_step": errs, "n_samples": int(len(X)),
            "output_scale": float(np.abs(t1).max())}
