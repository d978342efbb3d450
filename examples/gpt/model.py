"""A small GPT (decoder-only transformer) in the shape of nanoGPT, plus an EMA of weights.

    cfg = GPTConfig(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=256)
    model = GPT(cfg)
    logits, loss = model(x, y)              # x, y: (B, T) int64, T <= block_size
    opt = model.configure_optimizer(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95))
    ema = EMA(model, decay=0.999)           # ema.update(model) after each optimizer step
    with ema.average_parameters(model):     # evaluate with the averaged weights
        ...

Dropout (embedding, attention, residual) is active in train() mode and draws from torch's
global RNG, so an exact resume must restore that RNG (accelerate's random_states does).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 8192
    block_size: int = 256  # longest context, in tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.1
    bias: bool = False  # biases in Linear and LayerNorm layers

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"[model] {name} must be a positive int, got {value!r}; set {name} >= 1")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"[model] n_embd must be a multiple of n_head, got n_embd={self.n_embd}, "
                f"n_head={self.n_head}; pick e.g. n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"[model] dropout must be in [0, 1), got {self.dropout!r}; use e.g. 0.1 (0 turns it off)")
        if not isinstance(self.bias, bool):
            raise ValueError(f"[model] bias must be true or false, got {self.bias!r}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # Fused kernel; is_causal builds the mask, so no (T, T) buffer is stored.
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if not isinstance(cfg, GPTConfig):
            raise TypeError(f"GPT needs a GPTConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # Weight tying: the output projection reuses the token embedding (fewer
        # parameters, and it trains better at this size).
        self.lm_head.weight = self.wte.weight

        self.apply(self._init_weights)
        # GPT-2 scaling: each residual branch's output projection gets std / sqrt(2 * n_layer),
        # so the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights counted once). non_embedding=True leaves out the
        position embedding; the token embedding counts, as it is also the output layer."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wpe.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids, T <= block_size. Returns logits (B, T, vocab_size) and,
        when targets (B, T) are given, the mean cross-entropy (targets == -1 ignored)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, time), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"sequence of {T} tokens is longer than block_size={self.config.block_size}; "
                "crop the input or build the model with a larger block_size"
            )
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizer(
        self, weight_decay: float, lr: float, betas: tuple[float, float] = (0.9, 0.95)
    ) -> torch.optim.AdamW:
        """AdamW with two groups: weight decay on matrices (Linear weights, embeddings),
        none on biases and LayerNorm weights (decaying those only hurts)."""
        if weight_decay < 0:
            raise ValueError(f"[optimizer] weight_decay must be >= 0, got {weight_decay}; use e.g. 0.1")
        if lr <= 0:
            raise ValueError(f"[optimizer] lr must be > 0, got {lr}; use e.g. 1e-3")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"[optimizer] betas must be two numbers in [0, 1), got {betas!r}; use e.g. (0.9, 0.95)")
        params = [p for p in self.parameters() if p.requires_grad]  # tied weight listed once
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T) and return (B, T + new).

        Runs in eval mode (no dropout) and restores the previous mode, so the result
        depends only on the weights, idx and `generator` (same generator state, same
        tokens). temperature=0 picks the most likely token; top_k keeps the k likeliest."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}; use 1.0 (0 = greedy)")
        if top_k is not None and not 1 <= top_k <= self.config.vocab_size:
            raise ValueError(f"top_k must be in [1, {self.config.vocab_size}] or None, got {top_k}")
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                context = idx[:, -self.config.block_size :]
                logits, _ = self(context)
                logits = logits[:, -1, :].float()
                if temperature == 0:
                    next_id = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = F.softmax(logits, dim=-1)
                    next_id = torch.multinomial(probs, num_samples=1, generator=generator)
                idx = torch.cat([idx, next_id], dim=1)
        finally:
            self.train(was_training)
        return idx


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers.

    After each optimizer step: shadow = d * shadow + (1 - d) * param, where
    d = decay, or with warmup=True d = min(decay, (1 + n) / (10 + n)) for the n-th update
    (n = 0, 1, ...), so early averages are not dominated by the random initial weights.
    Pass the unwrapped model (accelerator.unwrap_model(model)): parameters are matched by
    name. state_dict()/load_state_dict() make it checkpointable (e.g. with
    accelerator.register_for_checkpointing(ema)).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(f"[ema] decay must be in [0, 1), got {decay!r}; use e.g. 0.999")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: t.detach().clone().float() for name, t in self._tracked(model)
        }
        self._backup: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _tracked(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        # named_parameters() lists a tied weight once; integer buffers are not averaged.
        yield from model.named_parameters()
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                yield name, buf

    def to(self, device: torch.device | str) -> "EMA":
        """Move the averages (e.g. onto the model's device after accelerator.prepare)."""
        self.shadow = {name: t.to(device) for name, t in self.shadow.items()}
        return self

    def current_decay(self) -> float:
        """The decay the next update() will use."""
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    def _matched(self, model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        tracked = dict(self._tracked(model))
        if tracked.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - tracked.keys())[:3]
            extra = sorted(tracked.keys() - self.shadow.keys())[:3]
            raise ValueError(
                f"[ema] the model's parameters do not match the EMA's (missing {missing}, "
                f"unexpected {extra}); pass the same unwrapped model (accelerator.unwrap_model(model))"
            )
        for name, t in tracked.items():
            yield self.shadow[name], t

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for shadow, t in self._matched(model):
            shadow.lerp_(t.detach().to(shadow.device, torch.float32), 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's weights with the averages."""
        for shadow, t in self._matched(model):
            t.copy_(shadow)

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block the model holds the averaged weights; its own come back after."""
        if self._backup is not None:
            raise RuntimeError("[ema] average_parameters() is already active; do not nest it")
        self._backup = {name: t.detach().clone() for name, t in self._tracked(model)}
        try:
            self.copy_to(model)
            yield model
        finally:
            with torch.no_grad():
                for name, t in self._tracked(model):
                    t.copy_(self._backup[name])
            self._backup = None

    def state_dict(self) -> dict:
        """References to the averages, as nn.Module.state_dict gives (a save copies what it keeps:
        a clone here would be a second copy of the weights at every checkpoint)."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": dict(self.shadow),
        }

    def load_state_dict(self, state: dict) -> None:
        shadow = state.get("shadow")
        if not isinstance(shadow, dict) or shadow.keys() != self.shadow.keys():
            raise ValueError(
                "[ema] the saved EMA does not match this model's parameters; "
                "resume with the same model config or start without the EMA state"
            )
        for name, t in shadow.items():
            if t.shape != self.shadow[name].shape:
                raise ValueError(
                    f"[ema] saved EMA tensor {name} has shape {tuple(t.shape)}, the model "
                    f"{tuple(self.shadow[name].shape)}; resume with the same model config"
                )
        with torch.no_grad():
            for name, t in shadow.items():
                self.shadow[name].copy_(t)
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
