"""The PyTorch side of `python -m benchmarks.bench`: the same model, loss and optimiser, written
the way a PyTorch user would write them, timed the way measure.py times the engine.

The model is CLLM's GPT-2 form written as nanoGPT writes it: tied `wte`, learned `wpe`, pre-LN blocks,
causal attention through F.scaled_dot_product_attention(is_causal=True), tanh GELU, no
dropout, float32. Module names match CLLM's parameter names, so the model starts from the
very parameters of a CLLMModel (its first loss then equals ours). The step is: mean
cross-entropy over non-<pad> targets, backward, global gradient clipping to 1.0,
torch.optim.AdamW(betas=(0.9, 0.95), eps=1e-8, weight decay on 2-D tensors only) with its
fused CPU kernel (falling back to foreach), zero_grad(set_to_none=True).

Imported only by the worker processes of measure.py, and only when torch is installed:
torch is a benchmark comparison, not a dependency of CLLM.
"""
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cllm_cli.model import named_views

PAD = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, C, NH):
        super().__init__()
        self.NH = NH
        self.c_attn = nn.Linear(C, 3 * C)    # rows: q, k, v; head h owns slice h of each
        self.c_proj = nn.Linear(C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, NH, T, C/NH)
        q = q.view(B, T, self.NH, C // self.NH).transpose(1, 2)
        k = k.view(B, T, self.NH, C // self.NH).transpose(1, 2)
        v = v.view(B, T, self.NH, C // self.NH).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, C, F_):
        super().__init__()
        self.c_fc = nn.Linear(C, F_)
        self.c_proj = nn.Linear(F_, C)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, C, NH, F_):
        super().__init__()
        self.ln_1 = nn.LayerNorm(C, eps=1e-5)
        self.attn = CausalSelfAttention(C, NH)
        self.ln_2 = nn.LayerNorm(C, eps=1e-5)
        self.mlp = MLP(C, F_)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    """The CLLM model in PyTorch; forward(idx, targets) returns the mean loss."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C = cfg.embed_dim
        self.wte = nn.Embedding(cfg.vocab_size, C)     # also the output projection (tied)
        self.wpe = nn.Embedding(cfg.seq_len, C)
        self.h = nn.ModuleList(Block(C, cfg.num_heads, cfg.ff_dim) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(C, eps=1e-5)

    def forward(self, idx, targets):
        B, T = idx.shape
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=PAD)

    def load_flat(self, cfg, flat):
        """Copies the parameters of a CLLM flat buffer (its names and layout)."""
        own = dict(self.named_parameters())
        with torch.no_grad():
            for name, src in named_views(cfg, flat).items():
                key = name + ".weight" if name in ("wte", "wpe") else name
                own[key].copy_(torch.from_numpy(np.array(src)))


def make_optimizer(model, lr, weight_decay):
    """AdamW as CLLM's: decay on 2-D tensors only; the fused CPU kernel when this
    torch has it, else foreach. Returns (optimizer, kind)."""
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() != 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True), "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, foreach=True), "foreach"


def run(spec, cfg, flat, batches, burn_in_and_time):
    """Times training steps of the PyTorch model. spec: {"impl": "torch-eager" |
    "torch-compile", "threads", "warmup", "steps", "lr", "weight_decay", "grad_clip"};
    batches: int32 [B, T+1] arrays, one per step; burn_in_and_time(step_fn, warmup, steps) is
    measure.py's loop and returns {"times": seconds of each timed step, ...}. The first
    burn-in step runs (and compiles) separately so that its time is reported. Returns a dict
    of figures."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = TorchGPT(cfg)
    model.load_flat(cfg, flat)
    model.train()
    optimizer, opt_kind = make_optimizer(model, spec["lr"], spec["weight_decay"])
    params = [p for p in model.parameters()]
    forward = model
    if spec["impl"] == "torch-compile":
        forward = torch.compile(model)
    data = [(torch.from_numpy(b[:, :-1].astype(np.int64)), torch.from_numpy(b[:, 1:].astype(np.int64)))
            for b in batches]
    losses = []

    autocast = spec.get("precision") == "bf16"

    def step(i):
        x, y = data[i]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = forward(x, y)
        loss.backward()
        if spec["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, spec["grad_clip"], foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    t0 = time.perf_counter()
    try:
        step(0)      # the first step includes torch.compile's compilation
    except Exception as exc:  # noqa: BLE001 - any compile failure is reported, not raised
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    first_step = time.perf_counter() - t0
    timed = burn_in_and_time(lambda i: step(i + 1), max(spec["warmup"] - 1, 0), spec["steps"])
    return {**timed, "first_step_seconds": first_step, "losses": losses,
            "optimizer": opt_kind, "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads()}
