"""A vanilla soft prompt (prompt tuning) in front of a frozen causal LM, as used to recover compressed LLMs.

Compress, Then Prompt: Improving Accuracy-Efficiency Trade-off of LLM Inference with Transferable Prompt
(Xu et al., 2023), https://arxiv.org/abs/2305.11186: k learned vectors P (k, d) are prepended to the token
embeddings of every input of the *compressed, frozen* model and trained with the ordinary LM loss on generic text;
the same P is then reused on other texts, tasks and compression levels. This is prompt tuning (Lester et al., 2021)
exactly as ``peft``'s ``PromptTuningConfig`` does it for causal LMs: ``inputs_embeds = [P; E(x)]``, labels of
the virtual positions set to -100 (so the last virtual token predicts the first real one).

``SoftPromptLM.forward`` returns the logits of the real positions only (B, L, V), so that
:func:`reprolab.lm.perplexity` scores exactly the same tokens with and without a prompt.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput


class SoftPromptLM(nn.Module):
    """Frozen causal LM ``model`` with a trainable soft prompt ``P`` (k, d) prepended to its input embeddings."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor):
        super().__init__()
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.P = nn.Parameter(prompt.detach().clone().float())  # (k, d)

    @property
    def k(self) -> int:
        return self.P.shape[0]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **_) -> CausalLMOutput:
        B, L = input_ids.shape
        E = self.model.get_input_embeddings()(input_ids)  # (B, L, d)
        prompts = self.P.to(E.dtype).unsqueeze(0).expand(B, -1, -1)  # (B, k, d)
        logits = self.model(inputs_embeds=torch.cat([prompts, E], dim=1), use_cache=False).logits  # (B, k+L, V)
        loss = None
        if labels is not None:
            full = torch.cat([torch.full((B, self.k), -100, dtype=labels.dtype), labels], dim=1)  # (B, k+L)
            shifted = logits[:, :-1].flatten(0, 1)  # (B*(k+L-1), V)
            shifted = shifted.to(torch.promote_types(shifted.dtype, torch.float32))
            loss = nn.functional.cross_entropy(shifted, full[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits[:, self.k:])  # logits (B, L, V): real positions only


def init_prompt_from_tokens(model: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    """Initial P (k, d): the input embeddings of ``token_ids`` (k,) (peft's ``PromptTuningInit.TEXT``)."""
    with torch.no_grad():
        return model.get_input_embeddings()(token_ids).detach().clone()  # (k, d)


def sample_prompt_tokens(ids: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k consecutive token ids (k,) from a random position of the training stream ``ids`` (1, T)."""
    g = torch.Generator().manual_seed(seed)
    start = int(torch.randint(0, ids.shape[1] - k + 1, (1,), generator=g))
    return ids[0, start:start + k].clone()


def train_soft_prompt(lm: SoftPromptLM, batches: list[torch.Tensor], lr: float, max_grad_norm: float = 1.0,
                      progress=None, on_step=None) -> list[float]:
    """Adam on the prompt only, LM loss on each batch (B, L); returns the per-step losses.

    ``on_step(step)`` (optional) is called after each optimizer step with the 1-based step number, e.g. to score the
    prompt on held-out text mid-training; it must not change the prompt."""
    opt = torch.optim.Adam([lm.P], lr=lr)
    lm.model.eval()  # no dropout: the compressed model stays frozen and deterministic
    losses = []
    for x in (progress(batches) if progress else batches):
        loss = lm(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([lm.P], max_grad_norm)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if on_step is not None:
            on_step(len(losses))
    return losses


def gap_closed(ppl_reference: float, ppl_compressed: float, ppl_prompted: float) -> float:
    """Share of the perplexity gap closed: (ppl_c - ppl_c+P) / (ppl_c - ppl_ref); 1 = fully recovered."""
    return (ppl_compressed - ppl_prompted) / (ppl_compressed - ppl_reference)
