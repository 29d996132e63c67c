"""CLLM engine: the model's kernels and the ThreadedTrainingSystem, compiled as one module.

# Design:
# - Layouts. Every layout is defined once, here: PARAMETER_TABLE (model.pxi) lists the
#   tensors of SPEC section 1 in buffer order; offsets, the named views of the kernels
#   (ModelParams, LayerParams), the optimiser's chunks and parameter_layout() derive from it.
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
#   order are fixed (deterministic_math.h, no fast-math, no fused multiply-add), so results
#   are bit-identical from run to run.
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
# - Many processes (cllm_cli/parallel.py). A rank hands the spheres its block of a step's
#   micro-batches with first_microbatch, their global index within the step (inject_nan and
#   anything keyed per micro-batch use first_microbatch + mb), and kept_gradients: each
#   micro-batch's backward then writes into a row of its own and nothing is accumulated; the
#   ranks fold the rows in order, and optimizer_step(gradients=) applies the folded sum.
# - Dropout (training steps only). A micro-batch's masks are a pure function of (seed, step,
#   its index in the global batch, layer, site, element) (dropout.h, a counter-based hash),
#   drawn again in backward rather than stored, so they never depend on which sphere runs
#   the micro-batch. p = 0 (Dropout NULL or threshold 0) runs exactly the kernels without it.
# - Precision bf16 (bf16_gemm.h, loaded with load_bf16). Every matrix product rounds its
#   inputs to bf16 and runs on oneDNN's matmul with fp32 accumulation and output; each
#   sphere's Bf16Products (in its Activations; NULL for fp32) owns its oneDNN engine, stream,
#   primitives and scratchpad, and the system rounds the weights into bf16_weights when it
#   hands out a batch. A product's bits depend only on its shape and inputs, so the thread
#   count changes nothing here either.
# - Generation. Decoder keeps every layer's qkv rows of the positions so far and runs the
#   model on one new position: the same kernels on one row.
# - Locks. model_lock (rwlock): read by spheres around forward/backward (write in exclusive
#   mode), write by the optimiser step. gradient_lock (mutex) guards accumulated_gradients and
#   the accumulation turn. The order is always model_lock -> gradient_lock; never take
#   model_lock while holding gradient_lock. With debug_locks an out-of-order acquisition
#   aborts with a message naming both locks.
"""
import math

import numpy as np
from cpython.exc cimport PyErr_CheckSignals

include "blas.pxi"
include "kernels.pxi"
include "model.pxi"
include "optim.pxi"
include "threads.pxi"
include "op_wrappers.pxi"

WAIT_SLICE = 0.1     # seconds the main thread waits for the spheres between should_stop() calls

PROFILE_BUCKETS = tuple(PROFILE_BUCKET_NAMES[k].decode() for k in range(NUM_PROFILE_BUCKETS))


class StepAborted(Exception):
    """should_stop() asked to stop while the spheres were working: the step (or evaluation)
    was abandoned and nothing was applied."""


cdef ModelConfig model_config(object cfg) except *:
    """The engine's sizes, read from a model config (CLLMConfig or any object with its
    attributes)."""
    cdef ModelConfig c
    names = ("vocab_size", "embed_dim", "num_layers", "num_heads", "ff_dim", "seq_len")
    try:
        values = [getattr(cfg, name).__index__() for name in names]
    except AttributeError:
        raise TypeError(f"cfg must be a model config with integer {', '.join(names)}, "
                        f"not {type(cfg).__name__}") from None
    for name, value in zip(names, values):
        if not 1 <= value < 2 ** 31:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    c.V, c.C, c.L, c.NH, c.F, c.T = values
    if c.C % c.NH:
        raise ValueError(f"embed_dim {c.C} is not divisible by num_heads {c.NH}")
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
    """[(name, shape, offset)] of every parameter tensor in buffer order (SPEC section 1),
    offsets in floats; [out, in] shapes for linear weights."""
    cdef ModelConfig c = model_config(cfg)
    cdef int i, row, layer
    layout = []
    for i in range(num_tensors(&c)):
        tensor_row(&c, i, &row, &layer)
        spec = PARAMETER_TABLE[row]
        name = spec.name.decode()
        if layer >= 0:
            name = f"h.{layer}.{name}"
        shape = (dim_size(&c, spec.rows),)
        if spec.cols != DIM_NONE:
            shape += (dim_size(&c, spec.cols),)
        layout.append((name, shape, tensor_offset(&c, row, layer)))
    return layout


def tensor_at(cfg, index):
    """SPEC name of the parameter tensor holding flat element `index` (IndexError outside)."""
    cdef ModelConfig c = model_config(cfg)
    if not 0 <= index < model_size(&c):
        raise IndexError(f"element {index} is outside the {model_size(&c)} parameters")
    for name, shape, offset in parameter_layout(cfg):
        if index < offset + math.prod(shape):
            return name


def optimizer_chunks(cfg):
    """int64 [k, 3] rows (offset, size, decay) covering the buffer: the optimiser's units of
    work, every tensor cut into pieces of at most 16384 floats, decay on 2-D tensors."""
    cdef ModelConfig c = model_config(cfg)
    out = np.empty((count_optimizer_chunks(&c), 3), dtype=np.int64)
    cdef long long[:, ::1] rows = out
    fill_in_optimizer_chunks(&rows[0, 0], &c)
    return out


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
                       _Bf16Weights w, bint bf16) except -1:
    # after activations_alloc: a's products in bf16 when asked (w keeps the rounded weights)
    cdef size_t size = model_size(c)
    if not bf16:
        return 0
    w.data = <uint16_t*>malloc(size * sizeof(uint16_t))
    if w.data == NULL or activations_use_bf16(a, c, params, w.data) != 0:
        activations_free(a)
        raise MemoryError("cannot allocate the bf16 state")
    with nogil:
        bf16_round_rows(w.data, params, 1, size, size)
    return 0


def loss_and_grads(cfg, const float[::1] params,                # IN
                   const int[:, ::1] inputs,                     # IN  (B, n)
                   const int[:, ::1] targets,                    # IN  (B, n)
                   float[::1] grads,                             # OUT (overwritten)
                   int pad_id=0, int block_rows=0, double dropout=0.0,
                   unsigned long long seed=0, long long step=0, long long microbatch=0,
                   str precision="fp32"):
    """Summed loss over targets != pad_id (-1: every target counts) and its gradient, written
    into grads; returns (loss_sum, counted). block_rows: rows per block of the
    classifier and the loss (0: the engine's choice, classifier_block_rows). With dropout > 0
    the inputs are one training micro-batch: the masks of (seed, step, microbatch).
    precision: as Engine's."""
    cdef ModelConfig c = model_config(cfg)
    cdef Activations acts
    cdef Dropout d
    dropout_settings(&d, dropout, seed)
    d.step = step
    d.microbatch = microbatch
    cdef int B = inputs.shape[0], n = inputs.shape[1], counted = 0
    cdef double loss
    if targets.shape[0] != B or targets.shape[1] != n:
        raise ValueError("inputs and targets must have the same shape")
    if n < 1 or n > c.T or B < 1:
        raise ValueError(f"sequence length must be 1..{c.T}, got {n}")
    if params.shape[0] != model_size(&c) or grads.shape[0] != model_size(&c):
        raise ValueError("parameter buffer does not match the config")
    check_pad_id(pad_id, c.V)
    _check_tokens(inputs, c.V, "inputs")
    _check_tokens(targets, c.V, "targets")
    if block_rows < 0:
        raise ValueError("block_rows must be >= 0")
    cdef bint bf16 = check_precision(precision)
    cdef _Bf16Weights w = _Bf16Weights()
    if activations_alloc(&acts, &c, B, classifier_rows(&c, B, block_rows)) != 0:
        raise MemoryError("cannot allocate activations")
    use_precision(&acts, &c, &params[0], w, bf16)
    with nogil:
        loss = model_forward(&acts, &counted, <float*>&params[0], &c, &inputs[0, 0],
                             &targets[0, 0], n, B, n, pad_id, &grads[0], NULL, &d, NULL,
                             NULL)
        model_backward(&grads[0], &acts, <float*>&params[0], &c, &inputs[0, 0], n, &d, NULL,
                       NULL)
    cdef int status = acts.bf16.ctx.status if acts.bf16 != NULL else 0
    activations_free(&acts)
    check_products(status)
    return loss, counted


def forward_logits(cfg, const float[::1] params,                # IN
                   const int[:, ::1] inputs,                     # IN  (B, n)
                   float[:, :, ::1] logits,                      # OUT (B, n, V)
                   str precision="fp32"):
    cdef ModelConfig c = model_config(cfg)
    cdef Activations acts
    cdef int B = inputs.shape[0], n = inputs.shape[1], counted = 0
    if n < 1 or n > c.T or B < 1:
        raise ValueError(f"sequence length must be 1..{c.T}, got {n}")
    if params.shape[0] != model_size(&c):
        raise ValueError("parameter buffer does not match the config")
    if logits.shape[0] != B or logits.shape[1] != n or logits.shape[2] != c.V:
        raise ValueError("logits buffer has the wrong shape")
    _check_tokens(inputs, c.V, "inputs")
    cdef bint bf16 = check_precision(precision)
    cdef _Bf16Weights w = _Bf16Weights()
    if activations_alloc(&acts, &c, B, classifier_rows(&c, B, 0)) != 0:
        raise MemoryError("cannot allocate activations")
    use_precision(&acts, &c, &params[0], w, bf16)
    with nogil:
        model_forward(&acts, &counted, <float*>&params[0], &c, &inputs[0, 0], NULL, n, B, n,
                      -1, NULL, &logits[0, 0, 0], NULL, NULL, NULL)
    cdef int status = acts.bf16.ctx.status if acts.bf16 != NULL else 0
    activations_free(&acts)
    check_products(status)


cdef class BadMicroBatch:
    """A micro-batch left out of a step because its loss or gradient is not finite."""
    cdef readonly long long step     # the step index given to train_step
    cdef readonly int index          # micro-batch index within the step
    cdef readonly int sphere         # the sphere that computed it
    cdef readonly bint loss_finite
    cdef readonly object tensor      # SPEC name of the first tensor with a non-finite gradient, or None

    def __init__(self, long long step, int index, int sphere, bint loss_finite, tensor):
        self.step, self.index, self.sphere = step, index, sphere
        self.loss_finite, self.tensor = loss_finite, tensor

    def __repr__(self):
        return (f"BadMicroBatch(step={self.step}, index={self.index}, sphere={self.sphere}, "
                f"loss_finite={self.loss_finite}, tensor={self.tensor!r})")


cdef class StepResult:
    """What one train_step did."""
    cdef readonly double loss        # loss_sum / tokens; nan without a counted token
    cdef readonly double loss_sum    # summed loss of the valid micro-batches
    cdef readonly long long tokens   # counted targets of the valid micro-batches
    cdef readonly int micro_batches  # micro-batches in the step, valid or not
    cdef readonly double grad_norm   # of the mean gradient, before clipping; nan if not run
    cdef readonly bint applied       # the optimiser changed the weights
    cdef readonly list bad           # the BadMicroBatch left out, in micro-batch order

    def __init__(self, double loss_sum, long long tokens, int micro_batches, double grad_norm,
                 bint applied, list bad):
        self.loss = loss_sum / tokens if tokens else math.nan
        self.loss_sum, self.tokens, self.micro_batches = loss_sum, tokens, micro_batches
        self.grad_norm, self.applied, self.bad = grad_norm, applied, bad

    def __repr__(self):
        return (f"StepResult(loss={self.loss!r}, tokens={self.tokens}, micro_batches="
                f"{self.micro_batches}, grad_norm={self.grad_norm!r}, applied={self.applied}, "
                f"bad={self.bad!r})")


cdef class Engine:
    """The ThreadedTrainingSystem of one run: spheres started in __init__, joined in close()."""
    cdef ThreadedTrainingSystem* system
    cdef object cfg
    cdef object params_ref      # keeps the parameter buffer alive
    cdef object work_ref        # keeps the current windows alive while spheres read them
    cdef readonly int num_spheres, micro_batch, max_windows, pad_id

    def __init__(self, cfg, float[::1] params, int num_spheres, int micro_batch,
                 int max_windows, str lock_mode="shared", bint debug_locks=False,
                 int pad_id=0, double dropout=0.0, unsigned long long seed=0,
                 str precision="fp32"):
        """cfg: the model config (CLLMConfig); params: its flat buffer, updated in place by the
        optimiser; max_windows: the most windows one call hands the spheres; pad_id: targets
        equal to it are not counted (-1: every target counts); dropout: its probability in
        training steps (never in evaluate), masks keyed by seed, step and micro-batch;
        precision: "fp32", or "bf16" (every matrix product on bf16 inputs; load_bf16 first)."""
        cdef ModelConfig c = model_config(cfg)
        cdef Dropout d
        dropout_settings(&d, dropout, seed)
        if num_spheres < 1 or micro_batch < 1 or max_windows < 1:
            raise ValueError("num_spheres, micro_batch and max_windows must be >= 1")
        if lock_mode not in ("shared", "exclusive"):
            raise ValueError(f"lock_mode must be 'shared' or 'exclusive', not {lock_mode!r}")
        if params.shape[0] != model_size(&c):
            raise ValueError("parameter buffer does not match the config")
        check_pad_id(pad_id, c.V)
        cdef bint bf16 = check_precision(precision)
        self.cfg = cfg
        self.params_ref = params
        self.num_spheres = num_spheres
        self.micro_batch = micro_batch
        self.max_windows = max_windows
        self.pad_id = pad_id
        cdef int mode = LOCK_EXCLUSIVE if lock_mode == "exclusive" else LOCK_SHARED
        cdef int max_mb = (max_windows + micro_batch - 1) // micro_batch
        with nogil:
            self.system = threaded_system_create(c, &params[0], num_spheres, micro_batch, max_mb,
                                                 mode, debug_locks, pad_id, bf16)
        if self.system == NULL:
            raise MemoryError("cannot allocate or start the training spheres")
        self.system.dropout = d

    def __dealloc__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Stops and joins every sphere; the Engine is unusable afterwards."""
        if self.system != NULL:
            with nogil:
                threaded_system_destroy(self.system)
            self.system = NULL

    cdef ThreadedTrainingSystem* live(self) except NULL:
        if self.system == NULL:
            raise RuntimeError("the engine is closed")
        return self.system

    cdef int hand_out(self, const int[:, ::1] windows, int kind, long long step,
                      long long first_microbatch=0, kept=None) except -1:
        # checks windows (num_windows, n + 1) and kept (None, or one gradient row per
        # micro-batch) and starts the spheres on them
        cdef ThreadedTrainingSystem* s = self.live()
        cdef int nw = windows.shape[0], stride = windows.shape[1]
        cdef int n_micro = (nw + s.micro_batch - 1) // s.micro_batch
        cdef float[:, :] rows = None
        cdef float* kept_start = NULL
        cdef size_t kept_stride = 0
        if nw < 1 or n_micro > s.max_microbatches:
            raise ValueError(f"cannot run {nw} windows at once")
        if stride < 2 or stride - 1 > s.cfg.T:
            raise ValueError(f"windows must hold 2..{s.cfg.T + 1} tokens")
        if first_microbatch < 0:
            raise ValueError("first_microbatch must be >= 0")
        if kept is not None:
            rows = kept
            if (kind != WORK_TRAIN or rows.shape[0] < n_micro or rows.shape[1] != s.gradient_size
                    or rows.strides[1] != sizeof(float) or rows.strides[0] % sizeof(float)):
                raise ValueError(f"kept_gradients must be a training step's float32 "
                                 f"({n_micro}, {s.gradient_size}) rows")
            kept_start = &rows[0, 0]
            kept_stride = rows.strides[0] // sizeof(float)
        _check_tokens(windows, s.cfg.V, "windows")
        self.work_ref = (windows, kept)
        s.step_counter = step
        with nogil:
            threaded_start_batch(s, &windows[0, 0], nw, stride, kind, first_microbatch,
                                 kept_start, kept_stride)
        return 0

    cdef int run(self, const int[:, ::1] windows, int kind, long long step,
                 object should_stop, long long first_microbatch=0) except -1:
        # hands out windows and waits until the spheres are done, in slices of WAIT_SLICE
        # seconds without the GIL, asking should_stop() (and for signals) after each; a stop
        # aborts the spheres and raises StepAborted, an exception from either is re-raised
        cdef ThreadedTrainingSystem* s = self.live()
        cdef bint done = False
        cdef double slice_seconds = WAIT_SLICE
        self.hand_out(windows, kind, step, first_microbatch)
        try:
            while True:
                with nogil:
                    done = threaded_wait_work(s, slice_seconds)
                PyErr_CheckSignals()
                if should_stop is not None and should_stop():
                    raise StepAborted()
                if done:
                    break
        except BaseException:
            self.abort()
            with nogil:
                while not threaded_wait_work(s, 1.0):
                    pass
            self.work_ref = None
            raise
        self.work_ref = None
        check_products(threaded_bf16_status(s))
        return 0

    def train_step(self, const int[:, ::1] windows, long long step, float[::1] adam_m,
                   float[::1] adam_v, *, bint adamw, double lr, double weight_decay,
                   double grad_clip, long long t, should_stop=None,
                   long long first_microbatch=0):
        """One optimiser step on a global batch of windows (num_windows, n + 1): micro-batches
        through the spheres, their gradients summed in micro-batch order, then AdamW (adam_m,
        adam_v updated in place, t the 1-based AdamW step) or SGD with the mean gradient,
        clipped to grad_clip (0: no clipping). Micro-batches with a non-finite loss or
        gradient are left out; without a counted token the optimiser does not run. step is
        the 0-based step index (reports, inject_nan). should_stop: a callable asked between
        waits; when it returns True the step is abandoned and StepAborted raised.
        first_microbatch: the global-batch index of these windows' first micro-batch, for a
        process that hands its spheres a slice of the global batch (dropout masks are keyed
        by the global index)."""
        cdef ThreadedTrainingSystem* s = self.live()
        cdef StepTotals totals
        if adamw and (adam_m is None or adam_v is None or adam_m.shape[0] != s.gradient_size
                      or adam_v.shape[0] != s.gradient_size):
            raise ValueError("optimizer state does not match the parameters")
        if first_microbatch < 0:
            raise ValueError("first_microbatch must be >= 0")
        self.run(windows, WORK_TRAIN, step, should_stop, first_microbatch)
        memset(&totals, 0, sizeof(totals))
        tally_results(s, &totals)           # the epoch's and the spheres' statistics
        return self.apply_step(step, self.results(), adam_m, adam_v, adamw=adamw, lr=lr,
                               weight_decay=weight_decay, grad_clip=grad_clip, t=t)

    def apply_step(self, long long step, list results, float[::1] adam_m, float[::1] adam_v,
                   *, bint adamw, double lr, double weight_decay, double grad_clip,
                   long long t, float[::1] gradients=None):
        """The end of every training step, of one process or of a rank of many: `results`,
        one (loss_sum, counted, sphere, valid, bad_index) per micro-batch in micro-batch
        order, added up over the valid ones; the others reported as BadMicroBatch; then the
        optimiser on the summed gradient (the accumulated one, or `gradients`) divided by
        the counted tokens, when there are any. Returns the StepResult."""
        cdef double loss_sum = 0.0, norm = math.nan
        cdef long long tokens = 0
        cdef bint applied = False
        bad = []
        for index, (loss, counted, sphere, valid, bad_index) in enumerate(results):
            if not valid:
                bad.append(BadMicroBatch(step, index, sphere, isfinite(loss),
                                         tensor_at(self.cfg, bad_index)
                                         if bad_index >= 0 else None))
                continue
            loss_sum += loss
            tokens += counted
        if tokens:
            norm, applied = self.optimizer_step(tokens, adam_m, adam_v, adamw=adamw, lr=lr,
                                                weight_decay=weight_decay,
                                                grad_clip=grad_clip, t=t, gradients=gradients)
        return StepResult(loss_sum, tokens, len(results), norm, applied, bad)

    def evaluate(self, const int[:, ::1] windows, should_stop=None):
        """(loss_sum, tokens) of the windows (num_windows, n + 1), any number of them (run in
        slices of at most max_windows), losses summed in micro-batch order; StepAborted when
        should_stop() returns True."""
        cdef ThreadedTrainingSystem* s = self.live()
        cdef StepTotals totals
        cdef int start
        memset(&totals, 0, sizeof(totals))
        for start in range(0, windows.shape[0], self.max_windows):
            self.run(windows[start:start + self.max_windows], WORK_EVAL, -1, should_stop)
            tally_results(s, &totals)
        return totals.loss_sum, totals.tokens

    # -- the step in parts (a rank of a many-process run: cllm_cli/parallel.py) --------------

    def start(self, const int[:, ::1] windows, bint train, long long step=0,
              long long first_microbatch=0, kept_gradients=None):
        """Hands the spheres windows (num_windows, n + 1): a training step or an evaluation.
        first_microbatch: the global index, within the step, of the windows' first
        micro-batch (a rank of a many-process run hands its block; inject_nan counts in
        global indices). kept_gradients: None (the gradients are accumulated in order), or
        float32 rows (at least one per micro-batch, each of num_parameters floats, C order
        within a row) that receive each micro-batch's gradient, unsummed."""
        self.hand_out(windows, WORK_TRAIN if train else WORK_EVAL, step, first_microbatch,
                      kept_gradients)

    def wait(self, double timeout):
        """True when the current work is finished; False after `timeout` seconds."""
        cdef ThreadedTrainingSystem* s = self.live()
        cdef StepTotals totals
        cdef bint done
        with nogil:
            done = threaded_wait_work(s, timeout)
        if done:
            self.work_ref = None
            check_products(threaded_bf16_status(s))
            if s.work_kind == WORK_TRAIN and not s.tallied and not s.abort_step:
                memset(&totals, 0, sizeof(totals))
                tally_results(s, &totals)
        return done

    def abort(self):
        """Stops the current work: passes give up between blocks, nothing more is claimed or
        summed. The accumulated gradient is then meaningless until the next step."""
        cdef ThreadedTrainingSystem* s = self.live()
        with nogil:
            gradient_lock_acquire(s)
            cllm_store(&s.abort_step, 1)
            pthread_cond_broadcast(&s.accumulate_turn)
            gradient_lock_release(s)

    def results(self):
        """[(loss_sum, counted, sphere_id, valid, bad_index)] per micro-batch, in order."""
        cdef ThreadedTrainingSystem* s = self.live()
        cdef int i
        cdef int done = min(s.next_microbatch, s.num_microbatches)
        return [(s.results[i].loss_sum, s.results[i].counted, s.results[i].sphere_id,
                 bool(s.results[i].valid), s.results[i].bad_index) for i in range(done)]

    def optimizer_step(self, long long count, float[::1] m, float[::1] v, *, bint adamw,
                       double lr, double weight_decay, double grad_clip, long long t,
                       double beta1=0.9, double beta2=0.95, double eps=1e-8,
                       float[::1] gradients=None):
        """Applies a summed gradient divided by count: the accumulated gradient, or
        `gradients` (the step's sum over many processes; divided in place). Returns
        (grad_norm, applied)."""
        cdef ThreadedTrainingSystem* s = self.live()
        cdef OptimizerSettings o
        cdef double norm = 0.0
        cdef int applied
        cdef float* g = s.accumulated_gradients
        if count < 1:
            raise ValueError("count must be >= 1")
        if gradients is not None:
            if gradients.shape[0] != s.gradient_size:
                raise ValueError("gradients do not match the parameters")
            g = &gradients[0]
        if adamw and (m.shape[0] != s.gradient_size or v.shape[0] != s.gradient_size):
            raise ValueError("optimizer state does not match the parameters")
        o.adamw = adamw
        o.lr = lr
        o.weight_decay = weight_decay
        o.grad_clip = grad_clip
        o.beta1 = beta1
        o.beta2 = beta2
        o.eps = eps
        o.t = t
        with nogil:
            applied = threaded_optimizer_step(s, g, count, &m[0] if adamw else NULL,
                                              &v[0] if adamw else NULL, &o, &norm)
        return norm, bool(applied)

    # -- state and statistics ------------------------------------------------------------------

    def accumulated_gradients(self):
        """A copy of accumulated_gradients (the step's summed gradient before the optimiser
        divides it)."""
        cdef ThreadedTrainingSystem* s = self.live()
        out = np.empty(s.gradient_size, dtype=np.float32)
        cdef float[::1] o = out
        memcpy(&o[0], s.accumulated_gradients, s.gradient_size * sizeof(float))
        return out

    def sphere_stats(self):
        """Per sphere: id, symmetry group, training micro-batches, summed loss and counted
        tokens of the valid ones, busy seconds."""
        cdef ThreadedTrainingSystem* s = self.live()
        cdef SphereTrainingContext* ctx
        stats = []
        for i in range(s.num_worker_spheres):
            ctx = &s.sphere_contexts[i]
            stats.append({"sphere": ctx.sphere_id, "symmetry_group": ctx.symmetry_group,
                          "micro_batches": ctx.batches_processed, "loss_sum": ctx.batch_loss,
                          "tokens": ctx.batch_tokens, "busy_seconds": ctx.busy_seconds})
        return stats

    def begin_epoch(self):
        """Restarts epoch_loss (call between steps)."""
        cdef ThreadedTrainingSystem* s = self.live()
        s.epoch_loss = 0.0
        s.epoch_tokens = 0

    def epoch_stats(self):
        """(epoch_loss, epoch_tokens, total_batches): the summed training loss and counted
        tokens of the valid micro-batches since begin_epoch(), micro-batches since the start."""
        cdef ThreadedTrainingSystem* s = self.live()
        return s.epoch_loss, s.epoch_tokens, s.total_batches

    def set_profile(self, bint on):
        """Per-bucket timing in every sphere (a clock read per block and per phase); resets
        the timers."""
        cdef ThreadedTrainingSystem* s = self.live()
        s.profile = on
        for i in range(s.num_worker_spheres):
            for k in range(NUM_PROFILE_BUCKETS):
                s.sphere_contexts[i].profile_seconds[k] = 0.0

    def profile(self):
        """Seconds per PROFILE_BUCKETS name, summed over spheres."""
        cdef ThreadedTrainingSystem* s = self.live()
        return {PROFILE_BUCKETS[k]: sum(s.sphere_contexts[i].profile_seconds[k]
                                        for i in range(s.num_worker_spheres))
                for k in range(NUM_PROFILE_BUCKETS)}

    def inject_nan(self, long long step, long long microbatch):
        """Test hook: poisons the gradient of one micro-batch (its global index within the
        step) of one step with a NaN."""
        cdef ThreadedTrainingSystem* s = self.live()
        s.inject_step = step
        s.inject_microbatch = microbatch

    def violate_lock_order(self):
        """Test hook: takes gradient_lock, then model_lock; aborts the process in debug mode."""
        cdef ThreadedTrainingSystem* s = self.live()
        with nogil:
            gradient_lock_acquire(s)
            model_lock_acquire(s, False)
            model_lock_release(s)
            gradient_lock_release(s)


cdef class Decoder:
    """Generation with a key/value cache: feed(token) runs the model on one more position
    and returns its logits; the cost of a position does not grow with the positions before
    it, apart from the attention over them. Holds up to seq_len positions (a sliding window
    shifts every position, which makes the cache useless: reset() and start again)."""
    cdef DecodeCache cache
    cdef ModelConfig c
    cdef object params_ref      # keeps the parameter buffer alive
    cdef float* params

    def __cinit__(self):
        self.cache.memory = NULL

    def __init__(self, cfg, float[::1] params):
        self.c = model_config(cfg)
        if params.shape[0] != model_size(&self.c):
            raise ValueError("parameter buffer does not match the config")
        self.params_ref = params
        self.params = &params[0]
        if decode_cache_alloc(&self.cache, &self.c) != 0:
            raise MemoryError("cannot allocate the key/value cache")

    def __dealloc__(self):
        decode_cache_free(&self.cache)

    @property
    def length(self):
        """Positions in the cache."""
        return self.cache.n

    def reset(self):
        """Empties the cache."""
        self.cache.n = 0

    def feed(self, int token):
        """float32 [V]: the logits after `token` at the next position."""
        if self.cache.n >= self.c.T:
            raise ValueError(f"the cache is full ({self.c.T} positions)")
        if not 0 <= token < self.c.V:
            raise ValueError(f"token {token} is outside [0, {self.c.V})")
        with nogil:
            decode_forward(&self.cache, self.params, &self.c, token)
        out = np.empty(self.c.V, dtype=np.float32)
        cdef float[::1] o = out
        memcpy(&o[0], self.cache.logits, self.c.V * sizeof(float))
        return out
