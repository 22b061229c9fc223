"""FedPEFT: Conquering the Communication Constraints to Enable Large Pre-Trained Models in Federated Learning
(Sun, Khalid, Mendieta, Yang, Wang, Lee, Chen 2022), `arXiv:2210.01708 <https://arxiv.org/abs/2210.01708>`_.
The official repository (github.com/imguangyu/FedPEFT) holds only a README in the stored snapshot, so this follows the
paper's text; the PEFT modules are the ``peft`` library's.

FedAvg in which every client fine-tunes, and every message carries, only a small part of a frozen pre-trained model:

* ``full``   full fine-tuning: every parameter trains and travels (conventional FL; the paper's reference);
* ``head``   head-tuning: only the new linear classifier (the paper's lower baseline);
* ``bias``   FedPEFT-Bias (BitFit): every bias term of the encoder plus the head;
* ``lora``   FedPEFT-Adapter, here LoRA (``peft.LoraConfig`` on the attention query/value projections) plus the head;
* ``prompt`` FedPEFT-Prompt: prompt tuning (``peft.PromptTuningConfig``: learnable virtual tokens prepended to the
  input embeddings) plus the head.

The frozen encoder is all-MiniLM-L6-v2, a sentence-transformers model trained with MEAN pooling, so the classifier is
a linear head on the attention-mask-weighted mean of the last hidden states of the text tokens (its BERT pooler was
never trained and is not built). Flower is the engine: clients are
:class:`reprolab.distributed.flower.PartitionClient` subclasses and the server a ``Tracked`` FedAvg, so the bytes of
every message are counted from the serialized Flower messages (only the trainable tensors are in them).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ARMS = ("full", "head", "bias", "lora", "prompt")
PEFT_ARMS = ("bias", "lora", "prompt")
MAIN = "bias"  # the paper's most efficient prototype, FedPEFT-Bias: the registered claim


# ---------------------------------------------------------------------------------------------------------------------
# Data: which work a snippet of text comes from (the shipped public-domain texts), tokenized once
# ---------------------------------------------------------------------------------------------------------------------
def work_task(works: list[str], n_train: int, n_test: int, seed: int, min_words: int = 5, lines_per_example: int = 2):
    """Source attribution: label k = ``works[k]``. Each work gives ``n_train // K`` training and ``n_test // K`` test
    snippets (``reprolab.data.textcls.text_snippets``: consecutive qualifying lines, lower-cased), drawn without
    replacement with ``seed`` (disjoint); each split is shuffled. Returns (train_texts, train_y, test_texts, test_y)."""
    from reprolab.data.textcls import balanced_split, text_snippets

    pools = {label: text_snippets(name, min_words, lines_per_example) for label, name in enumerate(works)}
    return balanced_split(pools, n_train, n_test, seed, "work_task")


def tokenize(tok, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, (N, max_len) int64 each, padded / truncated to ``max_len``."""
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------------
# Model: a frozen encoder, the arm's PEFT module, a mean-pooling linear head
# ---------------------------------------------------------------------------------------------------------------------
class PooledClassifier(nn.Module):
    """Linear head on the attention-mask-weighted mean of the encoder's last hidden states over the TEXT tokens.

    With prompt tuning the encoder output has ``n_prompt`` virtual-token positions in front; they are not pooled
    (the text positions are the last T of the output)."""

    def __init__(self, encoder: nn.Module, hidden: int, num_labels: int, seed: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(hidden, num_labels)
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():  # BERT's initializer (normal, std 0.02; zero bias), seeded
            self.classifier.weight.normal_(0.0, 0.02, generator=gen)
            self.classifier.bias.zero_()

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, n_prompt + T, d)
        h = h[:, h.shape[1] - T:]  # (B, T, d): text positions only
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, d)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooled(input_ids, attention_mask))  # (B, K)


def trainable_filter(arm: str, name: str) -> bool:
    """Which parameters an arm trains (and sends): by name in ``PooledClassifier.named_parameters()``."""
    if arm not in ARMS:
        raise ValueError(f"arm {arm!r}; allowed: {', '.join(ARMS)}")
    if name.startswith("classifier."):
        return True
    return {"full": True, "head": False, "bias": name.endswith(".bias"), "lora": "lora_" in name,
            "prompt": "prompt_encoder" in name}[arm]


def build_model(arm: str, model_name: str, num_labels: int, *, seed: int, lora_r: int = 8, lora_alpha: int = 16,
                lora_targets: tuple = ("query", "value"), n_prompt: int = 10, dropout: float = 0.1) -> PooledClassifier:
    """The arm's model: the pretrained encoder (pooler not built), its PEFT module (``peft``), a seeded head;
    ``requires_grad`` set by :func:`trainable_filter`. Every frozen tensor is the pretrained one, on every client."""
    from transformers import AutoModel

    from reprolab.lm import model_source

    enc = AutoModel.from_pretrained(model_source(model_name), add_pooling_layer=False, hidden_dropout_prob=dropout,
                                    attention_probs_dropout_prob=dropout)
    hidden = enc.config.hidden_size
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        if arm == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            enc = inject_adapter_in_model(LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                     target_modules=list(lora_targets)), enc)
        elif arm == "prompt":
            from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

            # prompts start as the embeddings of random vocabulary tokens (peft's SAMPLE_VOCAB; its RANDOM init is
            # N(0, 1), far outside the scale of BERT's word embeddings), drawn from torch's seeded generator
            enc = get_peft_model(enc, PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION,
                                                         num_virtual_tokens=n_prompt,
                                                         prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB))
    model = PooledClassifier(enc, hidden, num_labels, seed)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable_filter(arm, name))
    return model


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def get_trainable(model: nn.Module) -> list[np.ndarray]:
    """The trainable tensors (float32 numpy, ``named_parameters`` order): what a message carries."""
    return [p.detach().cpu().numpy().astype(np.float32, copy=True) for p in model.parameters() if p.requires_grad]


def set_trainable(model: nn.Module, arrays: list[np.ndarray]) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    if len(params) != len(arrays):
        raise ValueError(f"set_trainable: {len(arrays)} arrays for {len(params)} trainable tensors")
    with torch.no_grad():
        for p, a in zip(params, arrays):
            p.copy_(torch.as_tensor(np.asarray(a, dtype=np.float32)).reshape(p.shape))


def count_params(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": int(total), "trainable": int(train), "fraction": train / total}


# ---------------------------------------------------------------------------------------------------------------------
# Local training and evaluation
# ---------------------------------------------------------------------------------------------------------------------
def _trim(ids: torch.Tensor, mask: torch.Tensor):
    """Drop the padding columns that no row of the batch uses (right padding): same outputs, less work."""
    L = int(mask.sum(1).max())
    return ids[:, :L], mask[:, :L]


def local_train(model: nn.Module, ids: np.ndarray, mask: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int,
                lr: float, seed: int) -> float:
    """One client's round: Adam (fresh state) on the trainable parameters for ``epochs`` local epochs of shuffled
    mini-batches, cross-entropy; returns the training seconds. Dropout active (train mode), seeded."""
    t0 = time.perf_counter()
    torch.manual_seed(int(seed))
    rng = np.random.default_rng(int(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    ids_t, mask_t, y_t = torch.as_tensor(ids), torch.as_tensor(mask), torch.as_tensor(y)
    model.train()
    for _ in range(int(epochs)):
        perm = rng.permutation(len(y))
        for i in range(0, len(y), int(batch_size)):
            idx = torch.as_tensor(perm[i:i + batch_size])
            b_ids, b_mask = _trim(ids_t[idx], mask_t[idx])
            opt.zero_grad()
            F.cross_entropy(model(b_ids, b_mask), y_t[idx]).backward()
            opt.step()
    model.eval()
    return time.perf_counter() - t0


@torch.no_grad()
def evaluate(model: nn.Module, ids: np.ndarray, mask: np.ndarray, y: np.ndarray, batch: int = 64) -> tuple[float, float]:
    """(cross-entropy, accuracy) in eval mode."""
    model.eval()
    ids_t, mask_t, y_t = torch.as_tensor(ids), torch.as_tensor(mask), torch.as_tensor(y)
    logits = torch.cat([model(*_trim(ids_t[i:i + batch], mask_t[i:i + batch])) for i in range(0, len(y), batch)])
    return float(F.cross_entropy(logits, y_t)), float((logits.argmax(1) == y_t).double().mean())


# ---------------------------------------------------------------------------------------------------------------------
# Flower: clients (a model cached per actor process) and the Tracked FedAvg server
# ---------------------------------------------------------------------------------------------------------------------
_CACHE: dict = {}


def cached_model(arm: str, spec: dict) -> PooledClassifier:
    """One model per (arm, spec) in each process (a Ray actor serves several clients and rounds): its trainable
    tensors are overwritten from every message and its frozen tensors never change, so reuse is exact."""
    key = (arm, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in spec.items())))
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = build_model(arm, **spec)
    return _CACHE[key]


def model_spec(cfg: dict, num_labels: int, seed: int) -> dict:
    return {"model_name": cfg["model"], "num_labels": int(num_labels), "seed": int(seed), "lora_r": cfg["lora_r"],
            "lora_alpha": cfg["lora_alpha"], "lora_targets": tuple(cfg["lora_targets"]), "n_prompt": cfg["n_prompt"],
            "dropout": cfg["dropout"]}


def make_client_fn(arm: str, shared_ref, hp: dict, seed: int):
    """``client_fn(context)`` for Flower: a client of ``arm`` reading its partition from ``shared_ref``."""
    from reprolab.distributed import flower as fl

    class PEFTClient(fl.PartitionClient):
        def fit(self, parameters, config):
            torch.set_num_threads(int(hp["threads"]))
            shared = fl.fetch(shared_ref)
            model = cached_model(arm, shared["spec"])
            set_trainable(model, parameters)
            idx = shared["parts"][self.partition]
            secs = local_train(model, shared["ids"][idx], shared["mask"][idx], shared["y"][idx],
                               epochs=hp["local_epochs"], batch_size=hp["batch_size"], lr=hp["lr"][arm],
                               seed=fl.client_seed(seed, self.partition, int(config["round"])))
            return get_trainable(model), len(idx), {"train_s": secs}

        def evaluate(self, parameters, config):  # server-side evaluation only (fraction_evaluate = 0)
            return 0.0, 1, {}

    return lambda context: PEFTClient(fl.partition_id(context))


def _strategy_class():
    from flwr.server.strategy import FedAvg

    from reprolab.distributed import flower as fl

    class TrackedFedAvg(fl.Tracked, FedAvg):
        """FedAvg (example-weighted mean of the clients' trainable tensors) with the ledger; keeps the clients'
        reported training seconds per round (benchmarks only)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.fit_seconds: dict[int, list[float]] = {}

        def aggregate_fit(self, server_round, results, failures):
            self.fit_seconds[int(server_round)] = [float(r.metrics["train_s"]) for _, r in self._sorted(results)]
            return super().aggregate_fit(server_round, results, failures)

    return TrackedFedAvg


def run_arm(arm: str, shared: dict, hp: dict, seed: int, *, num_clients: int, rounds: int, test: tuple,
            eval_rounds: list[int], num_cpus: int = 2, client_cpus: float = 1.0, ray_address: str | None = None,
            engine: str = "flower") -> dict:
    """One federated run of ``arm`` (full participation); the server evaluates its model on ``test`` after the
    rounds in ``eval_rounds``. Returns the accuracy curve, the byte ledger, clients' training seconds, wall seconds.

    ``engine``: "flower" = Flower's simulation engine (clients in Ray actors); "inprocess" = the same Flower client
    (``NumPyClient.to_client().fit``) and the same Tracked FedAvg strategy driven round by round in this process, the
    messages being the same serialized ``Parameters`` (for a machine where Ray cannot start)."""
    from reprolab.distributed import flower as fl

    Strategy = _strategy_class()
    server_model = build_model(arm, **shared["spec"])
    init = get_trainable(server_model)
    ids_te, mask_te, y_te = test
    curve: list[dict] = []

    def evaluate_fn(server_round, nds, config):
        if int(server_round) not in eval_rounds:
            return None
        set_trainable(server_model, nds)
        loss, acc = evaluate(server_model, ids_te, mask_te, y_te)
        curve.append({"round": int(server_round), "loss": loss, "acc": acc})
        return loss, {"acc": acc}

    strategy = Strategy(num_clients=num_clients, seed=seed, fraction_fit=1.0, fraction_evaluate=0.0,
                        min_fit_clients=num_clients, min_available_clients=num_clients, accept_failures=False,
                        on_fit_config_fn=lambda r: {"round": r}, evaluate_fn=evaluate_fn,
                        initial_parameters=fl.ndarrays_to_parameters(init))
    t0 = time.perf_counter()
    if engine == "flower":
        fl.simulate(strategy, make_client_fn(arm, fl.share(shared), hp, seed), num_clients=num_clients, rounds=rounds,
                    num_cpus=num_cpus, client_cpus=client_cpus, ray_address=ray_address)
    elif engine == "inprocess":
        drive_inprocess(strategy, make_client_fn(arm, shared, hp, seed), num_clients=num_clients, rounds=rounds)
    else:
        raise ValueError(f"engine {engine!r}; allowed: flower, inprocess")
    wall = time.perf_counter() - t0
    return {"curve": curve, "ledger": list(strategy.ledger), "fit_seconds": dict(strategy.fit_seconds),
            "wall_s": wall, "params": count_params(server_model), "n_tensors": len(init)}


class _Proxy:
    """Stands for a connected client in the in-process driver (the strategy reads only ``cid``)."""

    def __init__(self, cid: str):
        self.cid = cid


def drive_inprocess(strategy, client_fn, *, num_clients: int, rounds: int) -> None:
    """Flower's server loop for full participation, without Ray: round 0 evaluation, then per round every client's
    ``fit`` on the broadcast ``Parameters`` (in partition order), the strategy's ``aggregate_fit`` and ``evaluate``.
    The ledger logs the same serialized messages as in a simulation (``Tracked._log``)."""
    from types import SimpleNamespace

    from flwr.common import FitIns

    proxies = [_Proxy(f"inprocess-{k}") for k in range(num_clients)]
    strategy.partition_of.update({p.cid: k for k, p in enumerate(proxies)})
    params = strategy.initialize_parameters(client_manager=None)
    strategy.evaluate(0, params)
    for r in range(1, int(rounds) + 1):
        config = strategy.on_fit_config_fn(r)
        results = []
        for k, proxy in enumerate(proxies):
            strategy._log(r, "down", proxy, params)
            client = client_fn(SimpleNamespace(node_config={"partition-id": k})).to_client()
            results.append((proxy, client.fit(FitIns(params, config))))
        params, _ = strategy.aggregate_fit(r, results, [])
        strategy.evaluate(r, params)


def run_central(arm: str, spec: dict, train: tuple, val: tuple, *, epochs: int, batch_size: int, lr: float,
                seed: int) -> dict:
    """Centralised fine-tuning of one arm (no federation): the pre-flight check that each arm learns, and the
    learning-rate selection on a validation split. Returns the validation accuracy after each epoch."""
    model = build_model(arm, **spec)
    accs = []
    for e in range(int(epochs)):
        local_train(model, *train, epochs=1, batch_size=batch_size, lr=lr, seed=seed * 1000 + e)
        accs.append(evaluate(model, *val)[1])
    return {"val_acc": accs, "params": count_params(model)}
