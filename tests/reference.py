"""Independent plain-numpy reference of the CLLM model: the GPT-2 forward and backward, and the
optimiser, learning-rate schedule and clipping.

Used by the tests to check the Cython engine. Everything model-related is float64 and
written from the math: forward, a hand-written backward (manual backprop through every op,
no numerical differentiation), and float32 references of the optimiser, the learning-rate
schedule and gradient clipping.

Shapes: B batch, n positions (n <= T), C = embed_dim, H heads, hs = C // H head size,
F = ff_dim, V = vocab_size. Linear layers use [out, in] weights: y = u @ W.T + b.
Targets equal to pad_id (0, <pad>, unless given) are not counted in the loss.

The layout of the flat buffer is the engine's table (_engine.parameter_layout, checked against
the tensor names, shapes and order written out by hand in test_engine_grads.py); everything else is independent.
"""
import math

import numpy as np

from cllm_cli._engine import DROPOUT_SITES, dropout_mask, parameter_layout
from cllm_cli.model import named_views

LN_EPS = 1e-5
GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBE = 0.044715


# ----------------------------------------------------------------------------
# parameters

def init_params(cfg, seed, std=0.02):
    """Deterministic float64 test init (not the training init): wte, wpe, linear weights and
    biases N(0, std); LayerNorm weight 1 + N(0, 0.1) and bias N(0, 0.1), so that every
    gradient term is exercised."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape, _ in parameter_layout(cfg):
        if name.startswith("ln_f.") or ".ln_" in name:
            if name.endswith(".weight"):
                params[name] = 1.0 + 0.1 * rng.standard_normal(shape)
            else:
                params[name] = 0.1 * rng.standard_normal(shape)
        else:  # wte, wpe, linear weights and biases
            params[name] = std * rng.standard_normal(shape)
    return params


def flatten(params, cfg, dtype=np.float32):
    """Dict name -> array to one flat buffer in parameter_layout order."""
    parts = [np.asarray(params[name], dtype=dtype).ravel() for name, _, _ in parameter_layout(cfg)]
    return np.concatenate(parts)


def unflatten(flat, cfg):
    """Flat buffer to dict name -> array (views) in parameter_layout order."""
    return named_views(cfg, flat)


# ----------------------------------------------------------------------------
# layers: forward returns (out, cache), backward returns input grads (+ param grads)

def encoder_forward(inputs, wte, wpe):
    """x[B, n, C] = wte[inputs] + wpe[:n]."""
    return wte[inputs] + wpe[:inputs.shape[1]]


def encoder_backward(dout, inputs, V, T):
    """Returns (dwte [V, C], dwpe [T, C]) of encoder_forward."""
    C = dout.shape[-1]
    dwte = np.zeros((V, C))
    np.add.at(dwte, inputs.ravel(), dout.reshape(-1, C))
    dwpe = np.zeros((T, C))
    dwpe[:inputs.shape[1]] = dout.sum(axis=0)
    return dwte, dwpe

def layernorm_forward(inp, weight, bias):
    """LayerNorm over the last axis, biased variance, eps 1e-5."""
    mean = inp.mean(axis=-1, keepdims=True)
    var = ((inp - mean) ** 2).mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + LN_EPS)
    xhat = (inp - mean) * rstd
    out = xhat * weight + bias
    return out, (xhat, rstd, weight)


def layernorm_backward(dout, cache):
    """Returns (dinp, dweight, dbias)."""
    xhat, rstd, weight = cache
    C = xhat.shape[-1]
    dweight = (dout * xhat).reshape(-1, C).sum(axis=0)
    dbias = dout.reshape(-1, C).sum(axis=0)
    dxhat = dout * weight
    # d/dx of (x - mean) * rstd, with mean and rstd depending on x
    dinp = rstd * (dxhat
                   - dxhat.mean(axis=-1, keepdims=True)
                   - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dinp, dweight, dbias


def product_input(x):
    """What a weight product (linear layers, the tied classifier) sees of an input: x itself.
    Tests of --precision bf16 swap in round_bf16."""
    return x


def round_bf16(x):
    """x as float32, then rounded to bf16 (nearest, ties to even), as float64."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    up = ((u & 0xFFFF) > 0x8000) | (((u & 0xFFFF) == 0x8000) & ((u >> 16) & 1 == 1))
    r = ((u >> 16) + up.astype(np.uint64)) << 16
    return r.astype(np.uint32).view(np.float32).astype(np.float64)


def bf16_values(bits):
    """bf16 bit patterns (uint16) as float64."""
    return (np.asarray(bits, np.uint32) << 16).view(np.float32).astype(np.float64)


def linear_forward(inp, weight, bias):
    """y = inp @ weight.T + bias, weight [out, in]."""
    return product_input(inp) @ product_input(weight).T + bias


def linear_backward(dout, inp, weight):
    """Returns (dinp, dweight, dbias) for y = inp @ weight.T + bias."""
    OC, IC = weight.shape
    dout2 = product_input(dout.reshape(-1, OC))
    inp2 = product_input(inp.reshape(-1, IC))
    dweight = dout2.T @ inp2
    dbias = dout.reshape(-1, OC).sum(axis=0)
    dinp = product_input(dout) @ product_input(weight)
    return dinp, dweight, dbias


def residual_forward(res, inp, weight, bias):
    """res + (inp @ weight.T + bias): a projection added onto the residual stream."""
    return res + linear_forward(inp, weight, bias)


def residual_backward(dout, inp, weight):
    """Returns (dres, dinp, dweight, dbias) for residual_forward."""
    return (dout,) + linear_backward(dout, inp, weight)


def gelu_forward(u):
    """tanh approximation: 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))."""
    return 0.5 * u * (1.0 + np.tanh(GELU_SCALE * (u + GELU_CUBE * u ** 3)))


def gelu_backward(dout, u):
    """dinp of gelu_forward at u."""
    th = np.tanh(GELU_SCALE * (u + GELU_CUBE * u ** 3))
    dth = (1.0 - th * th) * GELU_SCALE * (1.0 + 3.0 * GELU_CUBE * u * u)
    return dout * (0.5 * (1.0 + th) + 0.5 * u * dth)


def attention_forward(qkv, H, mask=None):
    """Causal multi-head attention. qkv [B, n, 3C] -> out [B, n, C]. mask: None, or the
    dropout factors [B, H, n, n] of the probabilities."""
    B, n, C3 = qkv.shape
    C = C3 // 3
    hs = C // H
    # [B, n, C] -> [B, H, n, hs]: head h owns columns h*hs..(h+1)*hs-1 of q, k and v
    q, k, v = (qkv[:, :, i * C:(i + 1) * C].reshape(B, n, H, hs).transpose(0, 2, 1, 3)
               for i in range(3))
    scale = 1.0 / math.sqrt(hs)
    pi = product_input
    preatt = (pi(q) @ pi(k).transpose(0, 1, 3, 2)) * scale  # [B, H, n, n]
    causal = np.tril(np.ones((n, n), dtype=bool))
    preatt = np.where(causal, preatt, -np.inf)
    att = np.exp(preatt - preatt.max(axis=-1, keepdims=True))
    att /= att.sum(axis=-1, keepdims=True)                  # masked entries are exactly 0
    used = att if mask is None else att * mask
    y = pi(used) @ pi(v)                                    # [B, H, n, hs]
    out = y.transpose(0, 2, 1, 3).reshape(B, n, C)          # heads concatenated in order
    return out, (q, k, v, att, scale, H, mask)


def attention_backward(dout, cache):
    """dqkv [B, n, 3C] for attention_forward."""
    q, k, v, att, scale, H, mask = cache
    B, _, n, hs = q.shape
    C = H * hs
    pi = product_input
    dy = dout.reshape(B, n, H, hs).transpose(0, 2, 1, 3)    # [B, H, n, hs]
    datt = pi(dy) @ pi(v).transpose(0, 1, 3, 2)             # [B, H, n, n]
    used = att
    if mask is not None:        # y = (att * mask) @ v
        used = att * mask
        datt = datt * mask
    dv = pi(used).transpose(0, 1, 3, 2) @ pi(dy)
    # softmax backward, scaled; masked entries have att == 0 so they get no gradient
    dpreatt = scale * att * (datt - (datt * att).sum(axis=-1, keepdims=True))
    dq = pi(dpreatt) @ pi(k)
    dk = pi(dpreatt).transpose(0, 1, 3, 2) @ pi(q)
    dqkv = np.empty((B, n, 3 * C))
    for i, d in enumerate((dq, dk, dv)):
        dqkv[:, :, i * C:(i + 1) * C] = d.transpose(0, 2, 1, 3).reshape(B, n, C)
    return dqkv


def crossentropy_forward(logits, targets, pad_id=0):
    """Returns (loss_sum, n_counted, cache): the SUM over positions with target != pad_id of
    -log softmax(logits)[target] (pad_id -1: every position counts)."""
    lg_max = logits.max(axis=-1, keepdims=True)
    lse = lg_max + np.log(np.exp(logits - lg_max).sum(axis=-1, keepdims=True))
    logprobs = logits - lse
    mask = targets != pad_id
    nll = -np.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return float(np.sum(nll[mask])), int(mask.sum()), (np.exp(logprobs), targets, mask)


def crossentropy_backward(cache):
    """dlogits of loss_sum: softmax - onehot(target) on counted positions, 0 elsewhere."""
    probs, targets, mask = cache
    dlogits = probs.copy()
    np.put_along_axis(dlogits, targets[..., None],
                      np.take_along_axis(dlogits, targets[..., None], axis=-1) - 1.0, axis=-1)
    return dlogits * mask[..., None]


# ----------------------------------------------------------------------------
# model

def _check_batch(cfg, inputs):
    inputs = np.asarray(inputs)
    if inputs.ndim != 2:
        raise ValueError("inputs must be [B, n]")
    if inputs.shape[1] > cfg.seq_len:
        raise ValueError(f"n = {inputs.shape[1]} > seq_len {cfg.seq_len}")
    return inputs.astype(np.int64)


def dropout_masks(p, seed, step, microbatch):
    """masks(layer, site name, shape) -> float64 factors (0 or 1 / (1 - p)) of one dropout
    site of one training micro-batch: the engine's generator, read through its shim."""
    def masks(layer, site, shape):
        flat = dropout_mask(p, seed, step, microbatch, layer, DROPOUT_SITES.index(site),
                            math.prod(shape))
        return flat.astype(np.float64).reshape(shape)
    return masks


def _forward_hidden(params, cfg, inputs, masks=None):
    """Embeddings + blocks + ln_f. Returns (lnf [B, n, C], cache). masks: None (no dropout)
    or dropout_masks(...): GPT-2's sites, the embedding sum, the attention probabilities and
    both projections before their residual adds."""
    inputs = _check_batch(cfg, inputs)
    B, n = inputs.shape
    x = encoder_forward(inputs, params["wte"], params["wpe"])
    drop = {}

    def dropped(u, layer, site, key):
        if masks is None:
            return u
        drop[key] = masks(layer, site, u.shape)
        return u * drop[key]

    x = dropped(x, 0, "embedding", "embedding")
    layers = []
    for l in range(cfg.num_layers):
        p = f"h.{l}."
        lc = {"x_in": x}
        ln1, lc["ln_1"] = layernorm_forward(x, params[p + "ln_1.weight"], params[p + "ln_1.bias"])
        qkv = linear_forward(ln1, params[p + "attn.c_attn.weight"], params[p + "attn.c_attn.bias"])
        att_mask = None if masks is None else masks(l, "attention", (B, cfg.num_heads, n, n))
        atty, lc["attn"] = attention_forward(qkv, cfg.num_heads, att_mask)
        proj = linear_forward(atty, params[p + "attn.c_proj.weight"], params[p + "attn.c_proj.bias"])
        x = x + dropped(proj, l, "attn_proj", (l, "attn_proj"))
        lc["x_mid"] = x
        ln2, lc["ln_2"] = layernorm_forward(x, params[p + "ln_2.weight"], params[p + "ln_2.bias"])
        fch = linear_forward(ln2, params[p + "mlp.c_fc.weight"], params[p + "mlp.c_fc.bias"])
        fch_gelu = gelu_forward(fch)
        proj = linear_forward(fch_gelu, params[p + "mlp.c_proj.weight"], params[p + "mlp.c_proj.bias"])
        x = x + dropped(proj, l, "mlp_proj", (l, "mlp_proj"))
        lc.update(ln1=ln1, atty=atty, ln2=ln2, fch=fch, fch_gelu=fch_gelu)
        layers.append(lc)
    lnf, lnf_cache = layernorm_forward(x, params["ln_f.weight"], params["ln_f.bias"])
    cache = {"inputs": inputs, "layers": layers, "lnf": lnf, "ln_f": lnf_cache, "drop": drop}
    return lnf, cache


def logits(params, cfg, inputs):
    """Forward only: logits [B, n, V] = ln_f(x) @ wte.T (tied output)."""
    lnf, _ = _forward_hidden(params, cfg, inputs)
    return product_input(lnf) @ product_input(params["wte"]).T


def forward(params, cfg, inputs, targets, pad_id=0, masks=None):
    """Returns (loss_sum, n_counted, cache): loss_sum is the SUM over positions with
    target != pad_id of -log softmax(logits)[target]; n_counted the number of such positions.
    masks: the dropout of a training micro-batch (dropout_masks), None for none."""
    lnf, cache = _forward_hidden(params, cfg, inputs, masks)
    targets = np.asarray(targets).astype(np.int64)
    if targets.shape != cache["inputs"].shape:
        raise ValueError("targets must have the shape of inputs")
    lg = product_input(lnf) @ product_input(params["wte"]).T    # [B, n, V]
    loss_sum, n_counted, cache["loss"] = crossentropy_forward(lg, targets, pad_id)
    return loss_sum, n_counted, cache


def backward(params, cfg, cache):
    """Hand-written gradient of loss_sum (the SUM, not the mean) for every parameter."""
    grads = {name: np.zeros(shape) for name, shape, _ in parameter_layout(cfg)}
    inputs = cache["inputs"]
    V = cfg.vocab_size
    dlogits = crossentropy_backward(cache["loss"])
    # tied output projection logits = lnf @ wte.T
    lnf = cache["lnf"]
    grads["wte"] += (product_input(dlogits.reshape(-1, V)).T
                     @ product_input(lnf.reshape(-1, lnf.shape[-1])))
    dlnf = product_input(dlogits) @ product_input(params["wte"])

    drop = cache["drop"]

    def residual(dy, x, name, key):
        """Backward of x_out = res + dropout(x @ W.T + b) with the projection name.weight,
        name.bias: adds its gradients to grads and returns (dres, dx)."""
        mask = drop.get(key)     # the projection's gradient is dropped like its output
        dx, dw, db = linear_backward(dy if mask is None else dy * mask, x,
                                     params[name + ".weight"])
        grads[name + ".weight"] += dw
        grads[name + ".bias"] += db
        return dy, dx

    def linear(dy, x, name):
        """Backward of y = x @ W + b for the parameters name.weight, name.bias: adds their
        gradients to grads and returns dx."""
        dx, dw, db = linear_backward(dy, x, params[name + ".weight"])
        grads[name + ".weight"] += dw
        grads[name + ".bias"] += db
        return dx

    def layernorm(dy, ln_cache, name):
        """Backward of a layer norm with the parameters name.weight, name.bias, likewise."""
        dx, dw, db = layernorm_backward(dy, ln_cache)
        grads[name + ".weight"] += dw
        grads[name + ".bias"] += db
        return dx

    dx = layernorm(dlnf, cache["ln_f"], "ln_f")
    # blocks in reverse; dx is the gradient of the residual stream
    for l in reversed(range(cfg.num_layers)):
        p = f"h.{l}."
        lc = cache["layers"][l]
        # x = x_mid + c_proj(gelu(c_fc(ln_2(x_mid))))
        dx, dfch_gelu = residual(dx, lc["fch_gelu"], p + "mlp.c_proj", (l, "mlp_proj"))
        dfch = gelu_backward(dfch_gelu, lc["fch"])
        dln2 = linear(dfch, lc["ln2"], p + "mlp.c_fc")
        dx = dx + layernorm(dln2, lc["ln_2"], p + "ln_2")
        # x_mid = x_in + c_proj(attn(c_attn(ln_1(x_in))))
        dx, datty = residual(dx, lc["atty"], p + "attn.c_proj", (l, "attn_proj"))
        dqkv = attention_backward(datty, lc["attn"])
        dln1 = linear(dqkv, lc["ln1"], p + "attn.c_attn")
        dx = dx + layernorm(dln1, lc["ln_1"], p + "ln_1")
    # embeddings: x = dropout(wte[inputs] + wpe[:n])
    if "embedding" in drop:
        dx = dx * drop["embedding"]
    dwte, dwpe = encoder_backward(dx, inputs, V, cfg.seq_len)
    grads["wte"] += dwte
    grads["wpe"] += dwpe
    return grads


def loss_and_grads(params, cfg, inputs, targets, pad_id=0, masks=None):
    """Convenience: (loss_sum, n_counted, grads) with grads of loss_sum."""
    loss_sum, n_counted, cache = forward(params, cfg, inputs, targets, pad_id, masks)
    return loss_sum, n_counted, backward(params, cfg, cache)


# ----------------------------------------------------------------------------
# optimisation references (float32, flat arrays)
#
# Conventions: hyper-parameter scalars (1 - lr*wd, 1 - beta1, the bias corrections
# 1 - beta**t, the clip scale) are computed in float64 then cast to float32; every
# array operation is float32, in the order the engine's optimiser step takes them.

def decay_mask(cfg):
    """Flat bool array: True on the elements of 2-D tensors (wte, wpe, linear weights)."""
    parts = [np.full(int(np.prod(shape)), len(shape) == 2) for _, shape, _ in parameter_layout(cfg)]
    return np.concatenate(parts)


def _decay(p, lr, weight_decay, mask):
    """Decoupled weight decay p *= (1 - lr*wd) on mask, in place."""
    if weight_decay != 0.0:
        p[mask] *= np.float32(1.0 - lr * weight_decay)


def adamw_reference(p, g, m, v, step, lr, weight_decay, decay_mask, beta1=0.9, beta2=0.95, eps=1e-8):
    """One AdamW step (step = 1-based t). Returns new float32 (p, m, v); inputs untouched."""
    f32 = np.float32
    p, g, m, v = (np.array(a, dtype=f32) for a in (p, g, m, v))
    mask = np.asarray(decay_mask, dtype=bool)
    _decay(p, lr, weight_decay, mask)
    m = f32(beta1) * m + f32(1.0 - beta1) * g
    v = f32(beta2) * v + f32(1.0 - beta2) * g * g
    mhat = m / f32(1.0 - beta1 ** step)
    vhat = v / f32(1.0 - beta2 ** step)
    p -= f32(lr) * mhat / (np.sqrt(vhat) + f32(eps))
    return p, m, v


def sgd_reference(p, g, lr, weight_decay, decay_mask):
    """Plain SGD with decoupled decay: p *= (1 - lr*wd) on mask, then p -= lr*g."""
    p = np.array(p, dtype=np.float32)
    g = np.asarray(g, dtype=np.float32)
    _decay(p, lr, weight_decay, np.asarray(decay_mask, dtype=bool))
    p -= np.float32(lr) * g
    return p


def lr_at(step, total_steps, lr, warmup, min_lr_ratio, schedule):
    """Learning rate at 0-based step: linear warm-up to lr over `warmup` steps, then
    cosine from lr to min_lr_ratio*lr at the last step (total_steps - 1), or flat."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}")
    ratio = (step - warmup) / max(1, total_steps - 1 - warmup)
    ratio = min(1.0, max(0.0, ratio))
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    lr_min = min_lr_ratio * lr
    return lr_min + coeff * (lr - lr_min)


def clip_reference(g, grad_clip):
    """Global L2-norm clipping. Returns (g_clipped float32, norm before clipping)."""
    g = np.array(g, dtype=np.float32)
    norm = math.sqrt(float(np.sum(g.astype(np.float64) ** 2)))
    if grad_clip > 0 and norm > grad_clip:
        g *= np.float32(grad_clip / norm)
    return g, norm
