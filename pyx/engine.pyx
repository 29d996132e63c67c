"""CLLM engine: the model's kernels and the ThreadedTrainingSystem, compiled as one module.

# Design:
# - Layouts. Every layout is defined once, here: a family's table (model/layout.pxi:
#   GPT2_ROWS, LLAMA_ROWS) lists the model's parameter tensors in buffer order; offsets, the
#   named views of the kernels (ModelParams, LayerParams), the optimiser's chunks and
#   parameter_layout() derive from it.
#   fill_in_activation_sizes / ACTIVATION_NAMES do the same for a sphere's activations
#   (LayerActs names one block's slices), PROFILE_BUCKET_NAMES for the profile. The engine
#   takes the model config object itself and imports nothing from cllm_cli.
# - Memory. Parameters live in one flat float32 buffer owned by the Python side (CLLMModel);
#   gradients and AdamW m/v use the same layout, so the optimiser, clipping and NaN checks are
#   flat loops. Each sphere owns its activations and its local_gradients: nothing a pass
#   writes is shared between spheres.
# - Activation memory. A sphere keeps from forward to backward only what backward cannot
#   recompute cheaply: per block the residual streams, qkv, the attention output, fch, and
#   per row the layer norms' mean and rstd and each attention row's max and 1/sum. Three
#   things are never held whole: the B x T x V logits (the classifier and the loss run in
#   blocks of at most 32 MB of logits, each block's backward fused with its forward:
#   classifier_forward), the T x T attention probabilities (one block of 32 query rows at a
#   time in a scratch, recomputed in backward from the row statistics), and the outputs of
#   ln_1, ln_2 and gelu (one block's worth, recomputed in backward). Every recomputation
#   repeats the forward's float operations, so it gives the forward's bits.
# - Kernels. Every backward kernel adds (+=) into every gradient it produces; clearing is the
#   caller's one explicit step: model_forward clears the micro-batch's gradient once
#   (a memset: about 1% of a micro-batch's time at the default model size) and each
#   activation gradient before the kernels that add into it. The float operations and their
#   order are fixed (kernels/deterministic_math.h, no fast-math, no fused multiply-add), so
#   results are bit-identical from run to run.
# - Threads. One pthread per sphere, created once per Engine and joined in close().
#   train_step hands the spheres a global batch; each sphere claims micro-batches (atomic
#   counter, in increasing order), runs forward + loss + backward into local_gradients, then
#   adds them to accumulated_gradients when it is that micro-batch's turn (micro-batch index
#   order), so the sum is (((g0 + g1) + g2) + ...) whatever the thread count. The main thread
#   then adds up the micro-batch results once (tally_results: the step's loss, the epoch's
#   and each sphere's statistics) and runs the optimiser step with all spheres over fixed
#   chunks of the buffer: sums of squares per chunk, batch_barrier, the norm added up in
#   chunk order by one sphere, batch_barrier, the update; the chunks never depend on the
#   thread count. Worker threads never touch a Python object; the main thread waits without
#   the GIL in slices of WAIT_SLICE seconds and asks should_stop() between them.
# - Many processes (cllm_cli/distributed/). A rank hands the spheres its block of a step's
#   micro-batches with first_microbatch, their global index within the step (dropout, the
#   testing extension's inject_nan and anything keyed per micro-batch use
#   first_microbatch + mb), and kept_gradients: each micro-batch's backward then writes into
#   a row of its own and nothing is accumulated; the ranks fold the rows in order, each
#   receiving its share of the sum: a contiguous run of the optimiser's chunks. The step
#   then runs in the halves of the spheres' optimiser work, on the share's chunks only:
#   mean_gradient_sumsq (the mean gradient and each chunk's sum of squares), then, once the
#   ranks have gathered every chunk's sum, optimizer_update (the norm added up in chunk
#   order, the clipping factor, the update of the share's weights and AdamW state: the
#   share's m and v only). Every element sees the float operations of one process's step.
# - Dropout (training steps only). A micro-batch's masks are a pure function of (seed, step,
#   its index in the global batch, layer, site, element) (kernels/dropout.h, a counter-based
#   hash), drawn again in backward rather than stored, so they never depend on which sphere runs
#   the micro-batch. p = 0 (Dropout NULL or threshold 0) runs exactly the kernels without it.
# - Precision bf16 (kernels/bf16_gemm.h, loaded with load_bf16). Every matrix product rounds
#   its inputs to bf16 and runs on oneDNN's matmul with fp32 accumulation and output; each
#   sphere's Bf16Products (in its Activations; NULL for fp32) owns its oneDNN engine, stream,
#   primitives and scratchpad, and the system rounds the weights into bf16_weights when it
#   hands out a batch. A product's bits depend only on its shape and inputs, so the thread
#   count changes nothing here either.
# - Generation. Decoder keeps every layer's qkv rows of the positions so far. A prompt runs
#   as one batched pass through the matrix products (prefill), each product cut into fixed
#   chunks of output columns shared out over the decoder's threads; each later position runs
#   its matrix-vector products split by output rows, every row summed in the same fixed order
#   whichever thread computes it (decoding/matvec.h), so the thread count changes nothing.
#   A scored prefill (decoding/scoring.pxi) runs the classifier on the positions asked for
#   only, in fixed vocabulary chunks, and returns the log-probabilities of given targets; the
#   cache can be cut back (truncate) so that the continuations of one context share its
#   positions.
# - Locks. model_lock (rwlock): read by spheres around forward/backward (write in exclusive
#   mode), write by the optimiser step. gradient_lock (mutex) guards accumulated_gradients and
#   the accumulation turn. The order is always model_lock -> gradient_lock; never take
#   model_lock while holding gradient_lock. With debug_locks an out-of-order acquisition
#   aborts with a message naming both locks.
# - Files. pyx/kernels/ holds the kernels of one micro-batch and their C headers, pyx/model/
#   the parameter and activation layouts, LoRA and the pass of a whole model, pyx/training/
#   the spheres, the system and Engine, pyx/decoding/ generation and scoring; this file
#   includes them all and holds the Python-facing helpers between them.
# - Test hooks. This module has none. testing/engine_testing.pyx compiles these same files
#   again into cllm_cli._engine_testing, for the tests only (setup.py builds it when
#   CLLM_TEST_BUILD=1; no install holds it): with CLLM_TESTING defined, so that a sphere can
#   poison a micro-batch's gradient (inject_nan), plus a Python wrapper of each kernel and
#   violate_lock_order.
"""
import math

import numpy as np

# The included files (paths under pyx/), each after everything it uses.
include "kernels/blas.pxi"               # the BLAS matrix product
include "kernels/common.pxi"             # C helpers (exact math, dropout, bf16), Bf16Products
include "kernels/layers.pxi"             # embedding, layer norm, linear, residual, GELU
include "kernels/llama_layers.pxi"       # RMSNorm, rotary positions, SwiGLU
include "kernels/attention.pxi"          # causal attention in blocks of query rows
include "kernels/loss.pxi"               # cross-entropy
include "model/layout.pxi"               # ModelConfig, the families' tables, the parameter views
include "model/lora.pxi"                 # LoRA adapters: their layout, forward and backward
include "model/activations.pxi"          # a sphere's activations and their named slices
include "model/llama_block.pxi"          # the Llama form's block, forward and backward
include "model/forward_backward.pxi"     # profile buckets, block and model forward / backward
include "training/optimizer.pxi"         # AdamW over chunks of the flat buffer
include "training/system_structs.pxi"    # pthread declarations, the system's structs, the locks
include "training/sphere.pxi"            # one sphere: micro-batches, accumulation, optimiser share
include "training/system.pxi"            # the system: create, hand out work, wait, tally, step
include "decoding/kv_cache.pxi"          # generation: the cache, its threads, one position
include "decoding/prefill.pxi"           # generation: the prompt as one batched pass
include "decoding/scoring.pxi"           # scoring: log-probabilities of targets after a prefill

WAIT_SLICE = 0.1     # seconds the main thread waits for the spheres between should_stop() calls

PROFILE_BUCKETS = tuple(PROFILE_BUCKET_NAMES[k].decode() for k in range(NUM_PROFILE_BUCKETS))


class StepAborted(Exception):
    """should_stop() asked to stop while the spheres were working: the step (or evaluation)
    was abandoned and nothing was applied."""


FAMILY_NAMES = ("gpt2", "llama")      # ModelConfig.family: FAMILY_GPT2, FAMILY_LLAMA


cdef ModelConfig model_config(object cfg) except *:
    """The engine's sizes, read from a model config (CLLMConfig or any object with its
    attributes; `family` "gpt2" when it has none). A Llama-form config adds num_kv_heads,
    rope_theta, tie_embeddings, attention_bias and rms_norm_eps."""
    cdef ModelConfig c
    names = ("vocab_size", "embed_dim", "num_layers", "num_heads", "ff_dim", "seq_len")
    family = getattr(cfg, "family", "gpt2")
    if family not in FAMILY_NAMES:
        raise ValueError(f"model family must be one of {', '.join(FAMILY_NAMES)}, "
                         f"not {family!r}")
    if family == "llama":
        names += ("num_kv_heads",)
    try:
        values = [getattr(cfg, name).__index__() for name in names]
    except AttributeError:
        raise TypeError(f"cfg must be a model config with integer {', '.join(names)}, "
                        f"not {type(cfg).__name__}") from None
    for name, value in zip(names, values):
        if not 1 <= value < 2 ** 31:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    c.family = FAMILY_NAMES.index(family)
    c.V, c.C, c.L, c.NH, c.F, c.T = values[:6]
    if c.C % c.NH:
        raise ValueError(f"embed_dim {c.C} is not divisible by num_heads {c.NH}")
    c.KVH, c.W, c.FW, c.tied, c.qkv_bias = c.NH, 3 * c.C, c.F, True, True
    c.norm_eps, c.rope_theta = 0.0, 0.0
    if family == "llama":
        c.KVH = values[6]
        if c.NH % c.KVH:
            raise ValueError(f"num_heads {c.NH} is not divisible by num_kv_heads {c.KVH}")
        if (c.C // c.NH) % 2:
            raise ValueError(f"the head size {c.C // c.NH} must be even (rotary positions "
                             f"rotate pairs)")
        c.W = c.C + 2 * c.KVH * (c.C // c.NH)
        c.FW = 2 * c.F
        if c.FW >= 2 ** 31:
            raise ValueError(f"ff_dim {c.F} is too large")
        c.tied = bool(cfg.tie_embeddings)
        c.qkv_bias = bool(cfg.attention_bias)
        c.norm_eps = cfg.rms_norm_eps
        c.rope_theta = cfg.rope_theta
        if not (c.norm_eps > 0 and math.isfinite(c.norm_eps)):
            raise ValueError(f"rms_norm_eps must be positive, got {cfg.rms_norm_eps}")
        if not (c.rope_theta > 1 and math.isfinite(c.rope_theta)):
            raise ValueError(f"rope_theta must be above 1, got {cfg.rope_theta}")
    return c


cdef int check_pad_id(object pad_id, int V) except -2:
    if not -1 <= pad_id < V:
        raise ValueError(f"pad_id must be -1 (no id ignored) or an id in [0, {V}), got {pad_id}")
    return pad_id


def num_parameters(cfg):
    """Floats in the flat parameter buffer."""
    cdef ModelConfig c = model_config(cfg)
    return model_size(&c)


def parameter_layout(cfg):
    """[(name, shape, offset)] of every parameter tensor in buffer order (the family's table,
    model/layout.pxi), offsets in floats; [out, in] shapes for linear weights."""
    cdef ModelConfig c = model_config(cfg)
    cdef int i, row, layer
    layout = []
    prefix = family_table(&c).block_prefix.decode()
    for i in range(num_tensors(&c)):
        tensor_row(&c, i, &row, &layer)
        if row_floats(&c, row) == 0:        # absent from this model
            continue
        spec = table_row(&c, row)[0]
        name = spec.name.decode()
        if layer >= 0:
            name = f"{prefix}{layer}.{name}"
        shape = (dim_size(&c, spec.rows),)
        if spec.cols != DIM_NONE:
            shape += (dim_size(&c, spec.cols),)
        layout.append((name, shape, tensor_offset(&c, row, layer)))
    return layout


def tensor_at(cfg, index):
    """Name (as in parameter_layout) of the parameter tensor holding flat element `index`
    (IndexError outside)."""
    cdef ModelConfig c = model_config(cfg)
    if not 0 <= index < model_size(&c):
        raise IndexError(f"element {index} is outside the {model_size(&c)} parameters")
    for name, shape, offset in parameter_layout(cfg):
        if index < offset + math.prod(shape):
            return name


def optimizer_chunks(cfg, lora=None):
    """int64 [k, 3] rows (offset, size, decay) covering the trained buffer in order: the
    optimiser's units of work, every tensor cut into pieces of at most 16384 floats, decay on
    2-D tensors. The buffer is the parameters', or with lora = (rank, targets, alpha,
    dropout), as an Engine takes it, the adapters'."""
    cdef ModelConfig c = model_config(cfg)
    cdef Lora lo
    cdef Lora* lora_ptr = NULL
    if lora is not None:
        lora_settings(&lo, lora, &c)
        lora_ptr = &lo
    out = np.empty((count_optimizer_chunks(&c, lora_ptr), 3), dtype=np.int64)
    cdef long long[:, ::1] rows = out
    fill_in_optimizer_chunks(&rows[0, 0], &c, lora_ptr)
    return out


# family name -> the linear layers of a block that can carry an adapter, in buffer order (bit
# k of a targets mask: site k)
ADAPTER_SITES = {
    "gpt2": tuple(GPT2_LORA_SITES[k].decode() for k in range(4)),
    "llama": tuple(LLAMA_LORA_SITES[k].decode() for k in range(LORA_SITES)),
}


cdef int lora_settings(Lora* lo, object lora, const ModelConfig* c) except -1:
    # lo from (rank, targets, alpha, dropout): targets a bit mask over the family's sites
    # (ADAPTER_SITES); the adapters' buffer is the caller's to set
    rank, targets, alpha, dropout = lora
    cdef Dropout d
    if not 1 <= rank < 2 ** 16:
        raise ValueError(f"LoRA rank must be in 1..65535, got {rank}")
    if not 0 < targets < 1 << lora_sites(c):
        raise ValueError(f"LoRA targets must be a non-empty mask of {lora_sites(c)} bits, "
                         f"got {targets}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"LoRA alpha must be positive, got {alpha}")
    dropout_settings(&d, dropout, 0)
    lo.rank, lo.targets, lo.scale = rank, targets, <float>(alpha / rank)
    lo.drop_threshold, lo.drop_scale = d.threshold, d.scale
    lo.params = NULL
    return 0


def adapter_layout(cfg, int rank, int targets):
    """[(name, shape, offset)] of the adapters of (rank, targets) in buffer order: per block,
    per adapted site (ADAPTER_SITES order), {block}.{site}.lora_A (rank, in) then lora_B
    (out, rank), {block} as the family's parameter names have it (h.{l}, layers.{l})."""
    cdef ModelConfig c = model_config(cfg)
    cdef Lora lo
    lora_settings(&lo, (rank, targets, 1.0, 0.0), &c)
    prefix = family_table(&c).block_prefix.decode()
    layout = []
    for l in range(c.L):
        for site in range(lora_sites(&c)):
            if lora_on(&lo, site):
                offset = lora_offset(&lo, &c, l, site)
                name = f"{prefix}{l}.{lora_site_name(&c, site).decode()}"
                layout.append((name + ".lora_A", (rank, site_in(&c, site)), offset))
                layout.append((name + ".lora_B", (site_out(&c, site), rank),
                               offset + rank * site_in(&c, site)))
    return layout


def num_adapter_parameters(cfg, int rank, int targets):
    """Floats in the flat adapter buffer of (rank, targets)."""
    cdef ModelConfig c = model_config(cfg)
    cdef Lora lo
    lora_settings(&lo, (rank, targets, 1.0, 0.0), &c)
    return lora_size(&lo, &c)


cdef int bind_lora(Lora* lo, const ModelConfig* c, object lora,
                   float[::1] adapters) except -1:
    # lo from lora = (rank, targets, alpha, dropout), pointing at `adapters`, whose size must
    # be that of the adapters of those settings
    lora_settings(lo, lora, c)
    if adapters is None or adapters.shape[0] != lora_size(lo, c):
        raise ValueError("adapter buffer does not match the LoRA settings")
    lo.params = &adapters[0]
    return 0


cdef int use_lora(Activations* a, const ModelConfig* c, Lora* lo, object lora,
                  float[::1] adapters) except -1:
    # after activations_alloc: a's passes with the adapters (lora, adapters), or as they are
    # when lora is None
    if lora is None:
        return 0
    try:
        bind_lora(lo, c, lora, adapters)
    except ValueError:
        activations_free(a)
        raise
    if activations_use_lora(a, c, lo) != 0:
        activations_free(a)
        raise MemoryError("cannot allocate the adapters' activations")
    return 0


def classifier_block_rows(cfg, int micro_batch):
    """Rows per block of the classifier and the loss for micro-batches of micro_batch windows:
    as many as 32 MB of logits hold (CLASSIFIER_FLOATS), at most a whole micro-batch."""
    cdef ModelConfig c = model_config(cfg)
    if micro_batch < 1:
        raise ValueError("micro_batch must be >= 1")
    return classifier_rows(&c, micro_batch, 0)


def activation_layout(cfg, int micro_batch):
    """[(name, floats)] of one sphere's activation tensors for micro-batches of micro_batch
    windows, in allocation order."""
    cdef ModelConfig c = model_config(cfg)
    cdef size_t sizes[NUM_ACTIVATION_TENSORS]
    if micro_batch < 1:
        raise ValueError("micro_batch must be >= 1")
    fill_in_activation_sizes(sizes, &c, micro_batch, classifier_rows(&c, micro_batch, 0))
    return [(ACTIVATION_NAMES[i].decode(), sizes[i]) for i in range(NUM_ACTIVATION_TENSORS)]


def activation_allocation(cfg, int micro_batch):
    """Floats one sphere allocates for its activations: activation_layout's tensors, each
    rounded up to 64 bytes, plus room to align the start."""
    cdef ModelConfig c = model_config(cfg)
    if micro_batch < 1:
        raise ValueError("micro_batch must be >= 1")
    return activation_floats(&c, micro_batch, classifier_rows(&c, micro_batch, 0))


def _check_tokens(const int[:, ::1] tokens, int V, str what):
    if tokens.shape[0] and tokens.shape[1]:
        arr = np.asarray(tokens)
        if arr.min() < 0 or arr.max() >= V:
            raise ValueError(f"{what} hold ids outside [0, {V})")


def _check_labels(const int[:, ::1] labels, int V):
    # targets: ids, or any negative value for a target that does not count
    if labels.shape[0] and labels.shape[1] and np.asarray(labels).max() >= V:
        raise ValueError(f"labels hold ids outside [0, {V}) (negative: not counted)")


# the label of a target that is not counted (the engine skips every negative one), as
# PyTorch's ignore_index -100 and transformers' labels
IGNORE_TARGET = -1


DROPOUT_SITES = ("embedding", "attention", "attn_proj", "mlp_proj")   # site numbers 0..3


cdef int dropout_settings(Dropout* d, double p, unsigned long long seed) except -1:
    # threshold and scale of inverted dropout with probability p (below 2^-33 it rounds to
    # threshold 0: no dropout); step and micro-batch unset
    if not 0 <= p < 1:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    d.threshold = <uint32_t>min(round(p * 2.0 ** 32), 2 ** 32 - 1)
    d.scale = <float>(1.0 / (1.0 - p))
    d.seed = seed
    d.step = 0
    d.microbatch = 0
    return 0


def dropout_mask(double p, unsigned long long seed, long long step, long long microbatch,
                 int layer, int site, size_t count):
    """float32 [count]: the factor (0 or 1 / (1 - p)) of elements 0..count-1 of one dropout
    site (DROPOUT_SITES index; the embedding site uses layer 0), as the kernels apply it.
    Element order: row * width + column for the embedding and projection sites, and
    ((b * NH + head) * n + row) * n + col for the attention probabilities."""
    cdef Dropout d
    dropout_settings(&d, p, seed)
    d.step = step
    d.microbatch = microbatch
    if not 0 <= site < len(DROPOUT_SITES):
        raise ValueError(f"site must be in 0..{len(DROPOUT_SITES) - 1}")
    out = np.ones(count, dtype=np.float32)
    cdef float[::1] o = out
    if count and d.threshold:
        dropout_apply(&o[0], &o[0], count, &d, dropout_key(&d, layer, site), 0)
    return out


def load_bf16(str path):
    """Loads oneDNN (libdnnl.so.3 of the onednn-cpu-gomp wheel) for precision "bf16";
    OSError with the loader's reason when it cannot."""
    cdef char err[512]
    if bf16_library_load(path.encode(), err, sizeof(err)) != 0:
        raise OSError(err.decode(errors="replace"))


cdef bint check_precision(str precision) except -1:
    # True for "bf16", False for "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', not {precision!r}")
    if precision == "bf16" and not bf16_library_loaded():
        raise RuntimeError("precision bf16 needs oneDNN: call load_bf16 first")
    return precision == "bf16"


MATMUL_KERNELS = ("blas", "onednn")     # the kernels of the fp32 weight products


cdef bint check_matmul(str matmul, bint bf16) except -1:
    # True for oneDNN's fp32 matmul; bf16 products are oneDNN's whatever the kernel
    if matmul not in MATMUL_KERNELS:
        raise ValueError(f"matmul must be one of {', '.join(MATMUL_KERNELS)}, not {matmul!r}")
    if matmul == "onednn" and not bf16_library_loaded():
        raise RuntimeError("matmul onednn needs oneDNN: call load_bf16 first")
    return matmul == "onednn" and not bf16


class ProductError(RuntimeError):
    """A bf16 matrix product failed in oneDNN (its output was NaN): the engine is unusable."""


cdef int check_products(int status) except -1:
    if status == -1 or status == 1:     # ours, or oneDNN's dnnl_out_of_memory
        raise MemoryError("a bf16 matrix product could not get its memory")
    if status != 0:
        raise ProductError(f"a bf16 matrix product failed (oneDNN status {status})")
    return 0


cdef class _Bf16Weights:
    # bf16(params) for one call of loss_and_grads / forward_logits
    cdef uint16_t* data

    def __dealloc__(self):
        free(self.data)


cdef int use_precision(Activations* a, const ModelConfig* c, const float* params,
                       _Bf16Weights w, bint bf16, bint onednn_fp32=False) except -1:
    # after activations_alloc: a's products in bf16 when asked (w keeps the rounded weights),
    # or its fp32 weight products on oneDNN's kernel
    cdef size_t size = model_size(c)
    if onednn_fp32:
        if activations_use_onednn_fp32(a) != 0:
            activations_free(a)
            raise MemoryError("cannot start oneDNN")
        return 0
    if not bf16:
        return 0
    w.data = <uint16_t*>malloc(size * sizeof(uint16_t))
    if w.data == NULL or activations_use_bf16(a, c, params, w.data) != 0:
        activations_free(a)
        raise MemoryError("cannot allocate the bf16 state")
    with nogil:
        bf16_round_rows(w.data, params, 1, size, size)
    return 0


# The Python classes and passes, which use the helpers above.
include "model/one_pass.pxi"             # loss_and_grads, forward_logits
include "training/engine_class.pxi"      # BadMicroBatch, StepResult, Engine
include "decoding/decoder_class.pxi"     # Decoder
