"""ReCIT: reconstructing full private records (prefix + PII) from LoRA gradients, in miniature.

Xie et al., "ReCIT: Reconstructing Full Private Data from Gradient in Parameter-Efficient Fine-Tuning of Large
Language Models", arXiv:2504.20570.

Implemented here (tested): SYNTHETIC personal records (generated names and phone numbers from a fixed seed, never
real personal data); the LoRA gradient structure the filter relies on -- for h = W x + s B A x,
dL/dA = s B^T sum_t delta_t x_t^T and dL/dB = s sum_t delta_t (A x_t)^T, so the rows of dL/dA lie in the span of the
layer's inputs x_t; the span filter that scores every vocabulary token by the residual of its first-layer input
after projection on that row space (tokens of the batch have residual ~0 while the span is not saturated); and the
recovery metrics. Below them, the end-to-end attack (our reading of the abstract-level description): Personal-Notes
malicious fine-tuning of the distributed adapter (:func:`pnote_finetune`), the victim's LoRA gradient
(:func:`lora_gradient`), filter-based token extraction on layer 0's LoRA-A gradients (:func:`filter_tokens`),
memorisation through the applied gradient (:func:`gradient_applied`) and token pairing by constrained decoding from
every filtered name-start token (:func:`reconstruct`); the baselines reuse the same pieces without the filter
(memorisation only) or without the memorisation step (span-filter gradient inversion).
"""
from __future__ import annotations

import numpy as np
import torch

_SYL = ("ka", "lo", "mi", "ra", "ven", "tor", "sa", "li", "dan", "mer", "ko", "ri", "bel", "na", "tus", "zo")


def make_records(n: int, seed: int, digits: int = 8) -> list[dict]:
    """``n`` SYNTHETIC records {first, last, phone, text}: names are random syllable strings, phones random digits."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        first = "".join(rng.choice(_SYL, size=2)).capitalize()
        last = "".join(rng.choice(_SYL, size=3)).capitalize()
        phone = "".join(str(d) for d in rng.integers(0, 10, size=digits))
        out.append({"first": first, "last": last, "phone": phone,
                    "text": f"My name is {first} {last}. My phone number is {phone}."})
    return out


def lora_grads_by_formula(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float):
    """LoRA gradients from the layer inputs x (N, d_in) and output gradients delta (N, d_out):
    dA = s B^T delta^T x (r, d_in), dB = s delta^T (x A^T) (d_out, r)."""
    dA = scale * B.T @ delta.T @ x  # (r, d_in)
    dB = scale * delta.T @ (x @ A.T)  # (d_out, r)
    return dA, dB


def span_basis(G: torch.Tensor, rel_tol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis (k, d) of the row space of the stacked gradients G (m, d), singular values > rel_tol * max."""
    _, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    k = int((S > rel_tol * S[0]).sum())
    return Vh[:k]  # (k, d)


def span_filter_scores(G: torch.Tensor, X: torch.Tensor, rel_tol: float = 1e-6) -> torch.Tensor:
    """Relative residual ||x_v - P x_v|| / ||x_v|| (V,) of every candidate input x_v (rows of X (V, d)) after
    projection P on the row space of G (m, d). Tokens present in the batch score ~0 while the span is unsaturated."""
    Q = span_basis(G, rel_tol)  # (k, d)
    Xd = X.double()
    resid = Xd - (Xd @ Q.T) @ Q  # (V, d)
    return (resid.norm(dim=1) / Xd.norm(dim=1).clamp_min(1e-12)).float()


def token_recovery(pred: set, true: set) -> dict:
    """Precision, recall and F1 of a recovered token set against the true one."""
    tp = len(pred & true)
    p = tp / len(pred) if pred else 0.0
    r = tp / len(true) if true else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def digit_accuracy(recovered: list[dict], rec: dict) -> float:
    """Partial PII recovery: the best share of the record's phone digits that a recovered candidate matches position by
    position (0 when nothing was recovered). Chance for one random candidate is 1/10 per digit."""
    return max((sum(a == b for a, b in zip(c["phone"], rec["phone"])) / len(rec["phone"]) for c in recovered),
               default=0.0)


def exact_pii_recovery(recovered: list[dict], records: list[dict]) -> float:
    """Share of records whose (first, last, phone) triple appears among the recovered ones."""
    got = {(r["first"], r["last"], r["phone"]) for r in recovered}
    return float(np.mean([(r["first"], r["last"], r["phone"]) in got for r in records])) if records else 0.0


# ---------------------------------------------------------------------------------------------------------------
# End-to-end attack (added): PNotes malicious fine-tuning, victim LoRA gradient, filter-based token extraction,
# gradient-applied memorisation and token pairing, plus the two baselines of the paper's comparison.
# ---------------------------------------------------------------------------------------------------------------
import re
from contextlib import contextmanager

TEMPLATE_PREFIX = "My name is"
RECORD_RE = re.compile(r"My name is ([A-Z][a-z]+) ([A-Z][a-z]+)\. My phone number is (\d+)")


def pnote_text(rec: dict) -> str:
    """A Personal-Notes sample: the record followed by a note restating its PII (the attacker's auxiliary data
    D_gen holds such samples for SYNTHETIC people, never the victim's)."""
    return f"{rec['text']} Note: {rec['first']} {rec['last']}, phone {rec['phone']}."


def attach_lora(model, r: int, alpha: int, targets: list[str], seed: int, init_b_std: float = 0.0):
    """Wrap a causal LM with a peft LoRA adapter (A random, B = init_b_std * N(0, 1), default B = 0)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
    if init_b_std:
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, init_b_std)
    return pm


def lm_batch(tok, texts: list[str]):
    """Right-padded token batch with labels (-100 on padding)."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return enc.input_ids, enc.attention_mask, labels


def lora_params(pm) -> dict:
    return {n: p for n, p in pm.named_parameters() if "lora_" in n}


def lora_gradient(pm, tok, texts: list[str]) -> dict:
    """The victim's shared update: gradient of the mean token loss of one batch w.r.t. every LoRA matrix."""
    ids, mask, labels = lm_batch(tok, texts)
    pm.zero_grad(set_to_none=True)
    pm(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in lora_params(pm).items()}
    pm.zero_grad(set_to_none=True)
    return grads


def pnote_finetune(pm, tok, aux: list[dict], steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """Malicious memory strengthening: train the LoRA adapter on D_gen = PNote-appended samples and plain samples
    (alternating) of auxiliary synthetic people; the adapter is then what the attacker distributes."""
    opt = torch.optim.AdamW(list(lora_params(pm).values()), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        pick = rng.choice(len(aux), size=batch_size, replace=False)
        texts = [pnote_text(aux[i]) if (step + j) % 2 == 0 else aux[i]["text"] for j, i in enumerate(pick)]
        ids, mask, labels = lm_batch(tok, texts)
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    opt.zero_grad(set_to_none=True)
    return losses


@torch.no_grad()
def first_layer_inputs(pm) -> torch.Tensor:
    """x_v = RMSNorm_0(E[v]) for every vocabulary token v (V, d): the input of layer 0's q/k/v projections, the same
    at every position (RoPE acts after the projection), so each batch token's x_t is one of these rows."""
    base = pm.get_base_model().model
    return base.layers[0].input_layernorm(base.embed_tokens.weight).float()


def layer0_rows(grads: dict, layer_key: str = "layers.0.") -> torch.Tensor:
    """The rows the filter reads: layer 0's LoRA-A matrices (of q/k/v) stacked, (3r, d)."""
    return torch.cat([g for n, g in grads.items() if layer_key in n and "lora_A" in n])


def filter_tokens(grads: dict, X: torch.Tensor, tau: float, layer_key: str = "layers.0.") -> tuple[torch.Tensor, torch.Tensor]:
    """Filter-based token extraction: stack the rows of every layer-0 dL/dA (they lie in span{x_t : t in batch}),
    score every vocabulary token by its relative residual outside that row space and keep those <= tau.
    Returns (kept token ids, scores (V,))."""
    G = layer0_rows(grads, layer_key)  # (3r, d)
    scores = span_filter_scores(G, X)
    return torch.nonzero(scores <= tau).flatten(), scores


@contextmanager
def gradient_applied(pm, grads: dict, eta: float, mode: str = "raw"):
    """Memorisation through the observed gradient: temporarily set the LoRA weights to theta - eta * g (``raw``) or
    theta - eta * sign(g) (``sign``: the size of Adam's first update, eta = steps x learning rate)."""
    params = lora_params(pm)
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p -= eta * (grads[n].sign() if mode == "sign" else grads[n])
    try:
        yield pm
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


@torch.no_grad()
def constrained_greedy(model, prefix: torch.Tensor, starts: list[int], allowed: torch.Tensor | None, max_new: int):
    """Greedy continuation of prefix (1, T) + each start token, restricted to ``allowed`` token ids (None = all),
    batched over starts with a KV cache. Returns (len(starts), T + 1 + max_new) ids."""
    ids = torch.cat([prefix.repeat(len(starts), 1), torch.tensor(starts)[:, None]], dim=1)
    out = model(input_ids=ids, use_cache=True)
    past, seq = out.past_key_values, ids
    mask = None
    if allowed is not None:
        mask = torch.full((out.logits.shape[-1],), float("-inf"))
        mask[allowed] = 0.0
    logits = out.logits[:, -1]
    for _ in range(max_new):
        nxt = (logits if mask is None else logits + mask).argmax(-1, keepdim=True)  # (S, 1)
        seq = torch.cat([seq, nxt], dim=1)
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    return seq


@torch.no_grad()
def mean_nll(model, tok, texts: list[str]) -> torch.Tensor:
    """Mean token NLL of each text (N,) under the model (for ranking candidates)."""
    ids, mask, labels = lm_batch(tok, texts)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none",
                                            ignore_index=-100)  # (N, T-1)
    return nll.sum(1) / (labels[:, 1:] != -100).sum(1)


def parse_candidates(tok, seqs: torch.Tensor, digits: int) -> list[dict]:
    """Records (first, last, phone, text) parsed from decoded sequences; malformed ones are dropped."""
    out = []
    for s in tok.batch_decode(seqs, skip_special_tokens=True):
        m = RECORD_RE.search(s)
        if m and len(m.group(3)) >= digits:
            first, last, phone = m.group(1), m.group(2), m.group(3)[:digits]
            out.append({"first": first, "last": last, "phone": phone,
                        "text": f"My name is {first} {last}. My phone number is {phone}."})
    return out


def name_start_tokens(tok, ids: torch.Tensor) -> list[int]:
    """Token ids among ``ids`` that can open a name: a space-prefixed capitalised piece not in the known template."""
    template = set(tok("My name is. My phone number is", add_special_tokens=False).input_ids)
    out = []
    for t in ids.tolist():
        piece = tok.convert_ids_to_tokens(t)
        if t not in template and piece.startswith("Ġ") and len(piece) > 1 and piece[1].isupper():
            out.append(t)
    return out


def reconstruct(model, tok, starts: list[int], allowed, max_new: int, digits: int, keep: int) -> list[dict]:
    """Token pairing: decode a record from every name-start token (the prefix tokens, then the PII digits that the
    model pairs with them), parse, de-duplicate, rank by mean NLL and keep the ``keep`` best."""
    if not starts:
        return []
    prefix = tok(TEMPLATE_PREFIX, return_tensors="pt").input_ids  # (1, T), with BOS
    cands = parse_candidates(tok, constrained_greedy(model, prefix, starts, allowed, max_new), digits)
    uniq = list({(c["first"], c["last"], c["phone"]): c for c in cands}.values())
    if not uniq:
        return []
    nll = mean_nll(model, tok, [c["text"] for c in uniq])
    order = torch.argsort(nll, stable=True).tolist()
    return [uniq[i] for i in order[:keep]]


@torch.no_grad()
def top_next_tokens(model, tok, k: int) -> list[int]:
    """The k most likely tokens after the template prefix (the memorisation-only attack's name starts)."""
    prefix = tok(TEMPLATE_PREFIX, return_tensors="pt").input_ids
    return model(input_ids=prefix).logits[0, -1].topk(k).indices.tolist()


# ---------------------------------------------------------------------------------------------------------------
# Optimisation-based gradient inversion baseline (TAG, Deng et al. 2021, arXiv:2103.06819; LAMP, Balunovic et al.
# 2022, arXiv:2202.08827): continuous input embeddings optimised so that the model's LoRA gradient on them matches
# the observed one, then projected to the nearest vocabulary embeddings. Same victim gradient as the other arms.
# ---------------------------------------------------------------------------------------------------------------
def gradient_distance(g_obs: dict, g: dict, metric: str = "tag", alpha: float = 0.01) -> torch.Tensor:
    """Distance between two gradient dicts (same keys), summed over the LoRA matrices l:
    ``tag``: sum_l ||g_l - g'_l||_2 + alpha ||g_l - g'_l||_1 (TAG's L2 + alpha L1);
    ``cos``: sum_l 1 - <g_l, g'_l> / (||g_l|| ||g'_l||) (LAMP's cosine distance)."""
    total = 0.0
    for n, go in g_obs.items():
        a, b = g[n].flatten(), go.flatten()
        if metric == "cos":
            total = total + 1.0 - (a @ b) / (a.norm() * b.norm()).clamp_min(1e-12)
        else:
            d = a - b
            total = total + d.norm() + alpha * d.abs().sum()
    return total


def _embedding_matrix(pm) -> torch.Tensor:
    return pm.get_base_model().get_input_embeddings().weight


def project_to_vocab(emb: torch.Tensor, E: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest vocabulary token (Euclidean) of each row of emb (..., d) among E's rows (or the ``allowed`` ids)."""
    cand = E if allowed is None else E[allowed]
    d2 = (emb.detach().float() ** 2).sum(-1, keepdim=True) - 2 * emb.detach().float() @ cand.float().T \
        + (cand.float() ** 2).sum(-1)
    idx = d2.argmin(-1)
    return idx if allowed is None else allowed[idx]


def lora_gradient_of_embeds(pm, emb: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                            create_graph: bool = True) -> dict:
    """LoRA gradient of the mean token loss on continuous input embeddings emb (B, T, d) (``create_graph`` keeps it
    differentiable w.r.t. emb, for gradient matching). ``labels``: token ids (B, T) (-100 = ignored) or soft
    next-token targets (B, T, V) (rows of zeros where ignored); the loss is the mean over positions with a target of
    the cross-entropy of position t-1's prediction against position t's target."""
    params = lora_params(pm)
    with torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False):
        logits = pm(inputs_embeds=emb, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V); math kernel: double backward
    if labels.dim() == 2:
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100)
    else:
        tgt = labels[:, 1:]  # (B, T-1, V)
        valid = tgt.sum(-1) > 0
        loss = -(tgt * torch.log_softmax(logits, -1)).sum(-1)[valid].mean()
    gs = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    return dict(zip(params.keys(), gs))


def soft_token_targets(emb: torch.Tensor, E: torch.Tensor, allowed: torch.Tensor | None, temp: float) -> torch.Tensor:
    """Differentiable next-token targets (B, T, V) for inversion: softmax over the (allowed) vocabulary of
    -||e_t - E_v||^2 / (temp * mean_v ||e_t - E_v||^2); one-hot in the limit where e_t is a token's embedding."""
    cand = E if allowed is None else E[allowed]
    d2 = (emb ** 2).sum(-1, keepdim=True) - 2 * emb @ cand.T + (cand ** 2).sum(-1)  # (B, T, V')
    p = torch.softmax(-d2 / (temp * d2.detach().mean(-1, keepdim=True).clamp_min(1e-12)), -1)
    if allowed is None:
        return p
    full = torch.zeros(*emb.shape[:2], E.shape[0], dtype=p.dtype)
    return full.scatter(-1, allowed.expand(*emb.shape[:2], -1), p)


def invert_gradient(pm, g_obs: dict, lengths: list[int], steps: int, lr: float, metric: str = "tag",
                    alpha: float = 0.01, allowed: torch.Tensor | None = None, seed: int = 0, temp: float = 0.05):
    """TAG/LAMP-style inversion: one continuous embedding sequence per record (token lengths known, right padding),
    initialised from N(0, sigma^2) with sigma the embedding table's scale, optimised with Adam for ``steps`` steps on
    :func:`gradient_distance` between the LoRA gradient on them and ``g_obs``. The LM targets (the sequence's own next
    tokens, unknown to the attacker) are :func:`soft_token_targets` of the current embeddings (differentiable).
    Finally each position is projected to the nearest vocabulary embedding (among ``allowed`` if given).
    Returns (token ids (B, T) with -1 on padding, per-step losses)."""
    E = _embedding_matrix(pm).detach().float()
    B, T = len(lengths), max(lengths)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    gen = torch.Generator().manual_seed(seed)
    emb = (torch.randn(B, T, E.shape[1], generator=gen) * E.std()).requires_grad_(True)
    opt = torch.optim.Adam([emb], lr=lr)
    losses = []
    for _ in range(steps):
        tgt = soft_token_targets(emb, E, allowed, temp) * mask[..., None]
        loss = gradient_distance(g_obs, lora_gradient_of_embeds(pm, emb, mask, tgt), metric, alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    pm.zero_grad(set_to_none=True)
    ids = project_to_vocab(emb, E, allowed).masked_fill(mask == 0, -1)
    return ids, losses


def decode_inverted(tok, ids: torch.Tensor, digits: int) -> list[dict]:
    """Records parsed (as :func:`parse_candidates`) from inverted token ids (B, T) with -1 on padding."""
    seqs = [[t for t in row if t >= 0] for row in ids.tolist()]
    out = []
    for s in seqs:
        out += parse_candidates(tok, torch.tensor([s]), digits)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The victim's update as a federated PEFT client sends it (added after the review of issue 14): local Adam steps on
# its own batch, from the distributed adapter; the server (the attacker) receives the difference of the adapters.
# ---------------------------------------------------------------------------------------------------------------
def victim_update(pm, batch: tuple, steps: list[int], lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                  with_first_grad: bool = False):
    """A FedAvg-style client update: ``max(steps)`` local Adam steps (torch.optim.Adam, learning rate ``lr``, no weight
    decay) on the mean token loss of the victim's ``batch`` = (input_ids, attention_mask, labels) (see
    :func:`lm_batch`), starting from the distributed adapter theta_0. Returns {k: g_eq} for every k in ``steps``, with
    g_eq = theta_0 - theta_k per LoRA matrix: the update the server receives, written as a gradient-equivalent
    difference (theta_k = theta_0 - 1 * g_eq, i.e. ``gradient_applied(pm, g_eq, 1.0)`` is the victim's model).
    One Adam step moves every weight by ~lr * sign(g) (Adam's first update); further steps follow the local loss.
    The adapter is restored to theta_0 afterwards. ``with_first_grad``: also return the gradient of step 1 (the
    gradient at theta_0, what gradient sharing's first round sends; = :func:`lora_gradient` of the batch) as
    ``(g0, {k: g_eq})``, which saves a separate forward/backward pass."""
    ids, mask, labels = batch
    params = lora_params(pm)
    saved = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.Adam(list(params.values()), lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    out, want, g0 = {}, set(steps), None
    try:
        for k in range(1, max(steps) + 1):
            opt.zero_grad(set_to_none=True)
            pm(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            if k == 1 and with_first_grad:
                g0 = {n: p.grad.detach().clone() for n, p in params.items()}
            opt.step()
            if k in want:
                out[k] = {n: (saved[n] - p.detach()).clone() for n, p in params.items()}
    finally:
        pm.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
    return (g0, out) if with_first_grad else out


def input_span_residual(G: torch.Tensor, Xin: torch.Tensor, rel_tol: float = 1e-6) -> float:
    """The premise of span-based extraction, measured with the ground truth (not the filter's output): the relative
    Frobenius residual ||G - G P||_F / ||G||_F of the observed rows G (m, d) after projection P on the row space of
    the batch's own first-layer inputs Xin (n, d). ~0 when the observation is a linear image of the private inputs
    (a LoRA-A gradient: rows in span{x_t}); near the random-subspace value when it no longer carries them."""
    Q = span_basis(Xin, rel_tol)  # (k, d) orthonormal
    Gd = G.double()
    return float((Gd - (Gd @ Q.T) @ Q).norm() / Gd.norm().clamp_min(1e-300))


def digit_chance(digits: int, n_candidates: int, p: float = 0.1) -> float:
    """Chance level of :func:`digit_accuracy`: E[max over n_candidates random phones of the share of positions
    matching the true one] = E[max of n iid Binomial(digits, p)] / digits (random digits: p = 1/10), exactly:
    sum_{j>=1} P(max >= j) = sum_j (1 - F(j - 1)^n) with F the Binomial CDF."""
    from math import comb

    pmf = [comb(digits, j) * p ** j * (1 - p) ** (digits - j) for j in range(digits + 1)]
    cdf = np.cumsum(pmf)
    return float(sum(1.0 - cdf[j - 1] ** n_candidates for j in range(1, digits + 1)) / digits)
