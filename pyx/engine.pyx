"""CLLM engine: the model's kernels and the ThreadedTrainingSystem, compiled as one module.

# Design:
# - Memory. Parameters live in one flat float32 buffer owned by the Python side (CLLMModel),
#   laid out as SPEC section 1; gradients and AdamW m/v use the same layout, so the optimiser,
#   clipping and NaN checks are flat loops. Each sphere owns its activations and its
#   local_gradients: nothing a pass writes is shared between spheres.
# - Threads. One pthread per sphere, created once per Engine and joined in close(). A step
#   hands the spheres a global batch; each sphere claims micro-batches (atomic counter, in
#   increasing order), runs forward + loss + backward into local_gradients, then adds them to
#   accumulated_gradients when it is that micro-batch's turn (micro-batch index order), so the
#   sum is (((g0 + g1) + g2) + ...) whatever the thread count. The backward pass overwrites
#   every element of local_gradients, so nothing is zeroed between micro-batches. The
#   optimiser step is run by all spheres over fixed chunks of the buffer: sums of squares per
#   chunk, batch_barrier, the norm added up in chunk order by one sphere, batch_barrier, the
#   update; the chunks never depend on the thread count. Worker threads never touch a Python
#   object; the main thread waits with time-outs so Python can notice Ctrl-C.
# - Locks. model_lock (rwlock): read by spheres around forward/backward (write in exclusive
#   mode), write by the optimiser step. gradient_lock (mutex) guards accumulated_gradients and
#   the accumulation turn. The order is always model_lock -> gradient_lock; never take
#   model_lock while holding gradient_lock. With debug_locks an out-of-order acquisition
#   aborts with a message naming both locks.
"""
import numpy as np

include "blas.pxi"
include "kernels.pxi"
include "model.pxi"
include "optim.pxi"
include "threads.pxi"


cdef ModelConfig config_from(tuple cfg) except *:
    # cfg = (V, C, L, NH, F, T)
    cdef ModelConfig c
    c.V, c.C, c.L, c.NH, c.F, c.T = cfg
    return c


def parameter_count(tuple cfg):
    cdef ModelConfig c = config_from(cfg)
    return model_size(&c)


def _check_tokens(const int[:, ::1] tokens, int V, str what):
    if tokens.shape[0] and tokens.shape[1]:
        arr = np.asarray(tokens)
        if arr.min() < 0 or arr.max() >= V:
            raise ValueError(f"{what} hold ids outside [0, {V})")


def loss_and_grads(tuple cfg, const float[::1] params,          # IN
                   const int[:, ::1] inputs,                     # IN  (B, n)
                   const int[:, ::1] targets,                    # IN  (B, n)
                   float[::1] grads):                            # OUT (overwritten)
    """Summed loss over non-pad targets and its gradient, written into grads; returns
    (loss_sum, counted)."""
    cdef ModelConfig c = config_from(cfg)
    cdef Activations acts
    cdef int B = inputs.shape[0], n = inputs.shape[1], counted = 0
    cdef double loss
    if targets.shape[0] != B or targets.shape[1] != n:
        raise ValueError("inputs and targets must have the same shape")
    if n < 1 or n > c.T or B < 1:
        raise ValueError(f"sequence length must be 1..{c.T}, got {n}")
    if params.shape[0] != model_size(&c) or grads.shape[0] != model_size(&c):
        raise ValueError("parameter buffer does not match the config")
    _check_tokens(inputs, c.V, "inputs")
    _check_tokens(targets, c.V, "targets")
    with nogil:
        if activations_alloc(&acts, &c, B) != 0:
            with gil:
                raise MemoryError("cannot allocate activations")
        loss = model_forward(&acts, &counted, <float*>&params[0], &c, &inputs[0, 0],
                             &targets[0, 0], n, B, n, True, NULL, NULL)
        model_backward(&grads[0], &acts, <float*>&params[0], &c, &inputs[0, 0], n, NULL, NULL)
        activations_free(&acts)
    return loss, counted


def forward_logits(tuple cfg, const float[::1] params,          # IN
                   const int[:, ::1] inputs,                     # IN  (B, n)
                   float[:, :, ::1] logits):                     # OUT (B, n, V)
    cdef ModelConfig c = config_from(cfg)
    cdef Activations acts
    cdef int B = inputs.shape[0], n = inputs.shape[1], counted = 0
    if n < 1 or n > c.T or B < 1:
        raise ValueError(f"sequence length must be 1..{c.T}, got {n}")
    if logits.shape[0] != B or logits.shape[1] != n or logits.shape[2] != c.V:
        raise ValueError("logits buffer has the wrong shape")
    _check_tokens(inputs, c.V, "inputs")
    with nogil:
        if activations_alloc(&acts, &c, B) != 0:
            with gil:
                raise MemoryError("cannot allocate activations")
        model_forward(&acts, &counted, <float*>&params[0], &c, &inputs[0, 0], NULL, n, B, n,
                      False, NULL, NULL)
        memcpy(&logits[0, 0, 0], acts.logits, <size_t>B * n * c.V * sizeof(float))
        activations_free(&acts)


cdef class Engine:
    """The ThreadedTrainingSystem of one run: spheres started in __init__, joined in close()."""
    cdef ThreadedTrainingSystem* system
    cdef object params_ref      # keeps the parameter buffer alive
    cdef object chunks_ref      # the optimiser's chunk table
    cdef object work_ref        # keeps the current windows alive while spheres read them
    cdef readonly int num_spheres, micro_batch

    def __init__(self, tuple cfg, float[::1] params, int num_spheres, int micro_batch,
                 int max_windows, str lock_mode="shared", bint debug_locks=False,
                 const long long[:, ::1] chunks=None):
        """chunks: (offset, size, decay) rows covering the buffer, the optimiser's units of
        work; their boundaries fix how the gradient norm is summed."""
        cdef ModelConfig c = config_from(cfg)
        if chunks is None:
            from cllm_cli.model import optimizer_chunks
            chunks = optimizer_chunks(cfg)
        if num_spheres < 1 or micro_batch < 1 or max_windows < 1:
            raise ValueError("num_spheres, micro_batch and max_windows must be >= 1")
        if lock_mode not in ("shared", "exclusive"):
            raise ValueError(f"lock_mode must be 'shared' or 'exclusive', not {lock_mode!r}")
        if params.shape[0] != model_size(&c):
            raise ValueError("parameter buffer does not match the config")
        if chunks is None or chunks.shape[0] < 1 or chunks.shape[1] != 3:
            raise ValueError("chunks must be an int64 array of (offset, size, decay) rows")
        covered = np.asarray(chunks)
        if covered[0, 0] != 0 or (covered[1:, 0] != covered[:-1, 0] + covered[:-1, 1]).any() \
                or covered[-1, 0] + covered[-1, 1] != model_size(&c):
            raise ValueError("chunks must cover the parameter buffer in order")
        self.params_ref = params
        self.chunks_ref = chunks
        self.num_spheres = num_spheres
        self.micro_batch = micro_batch
        cdef int mode = LOCK_EXCLUSIVE if lock_mode == "exclusive" else LOCK_SHARED
        cdef int max_mb = (max_windows + micro_batch - 1) // micro_batch
        with nogil:
            self.system = threaded_system_create(c, &params[0], &chunks[0, 0], chunks.shape[0],
                                                 num_spheres, micro_batch, max_mb, mode,
                                                 debug_locks)
        if self.system == NULL:
            raise MemoryError("cannot allocate or start the training spheres")

    def __dealloc__(self):
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

    def start(self, const int[:, ::1] windows, bint train, long long step=0):
        """Hands the spheres windows (num_windows, n + 1): a training step or an evaluation."""
        cdef ThreadedTrainingSystem* s = self.live()
        cdef int nw = windows.shape[0], stride = windows.shape[1]
        if nw < 1 or (nw + s.micro_batch - 1) // s.micro_batch > s.max_microbatches:
            raise ValueError(f"cannot run {nw} windows at once")
        if stride < 2 or stride - 1 > s.cfg.T:
            raise ValueError(f"windows must hold 2..{s.cfg.T + 1} tokens")
        _check_tokens(windows, s.cfg.V, "windows")
        self.work_ref = windows
        s.step_counter = step
        with nogil:
            threaded_start_batch(s, &windows[0, 0], nw, stride, WORK_TRAIN if train else WORK_EVAL)

    def wait(self, double timeout):
        """True when the current work is finished; False after `timeout` seconds."""
        cdef ThreadedTrainingSystem* s = self.live()
        cdef bint done
        with nogil:
            done = threaded_wait_work(s, timeout)
        if done:
            self.work_ref = None
        return done

    def abort(self):
        """Stops the current work: passes give up between layers, nothing more is claimed or
        summed. The accumulated gradient is then meaningless until the next start()."""
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

    def optimizer_step(self, int count, float[::1] m, float[::1] v, *, bint adamw, double lr, double weight_decay,
                       double grad_clip, long long t, double beta1=0.9, double beta2=0.95,
                       double eps=1e-8):
        """Applies the accumulated gradient divided by count; returns (grad_norm, applied)."""
        cdef ThreadedTrainingSystem* s = self.live()
        cdef OptimizerSettings o
        cdef double norm = 0.0
        cdef int applied
        if count < 1:
            raise ValueError("count must be >= 1")
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
            applied = threaded_optimizer_step(s, count, &m[0] if adamw else NULL,
                                              &v[0] if adamw else NULL, &o, &norm)
        return norm, bool(applied)

    def accumulated_gradients(self):
        """A copy of accumulated_gradients (the step's summed gradient before optimizer_step)."""
        cdef ThreadedTrainingSystem* s = self.live()
        out = np.empty(s.gradient_size, dtype=np.float32)
        cdef float[::1] o = out
        memcpy(&o[0], s.accumulated_gradients, s.gradient_size * sizeof(float))
        return out

    def sphere_stats(self):
        """Per sphere: id, symmetry group, micro-batches, summed loss, counted tokens, busy s."""
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
        """Per-op timing in every sphere (a clock read around each op); resets the timers."""
        cdef ThreadedTrainingSystem* s = self.live()
        s.profile = on
        for i in range(s.num_worker_spheres):
            for k in range(NUM_OPS):
                s.sphere_contexts[i].op_seconds[k] = 0.0

    def profile(self):
        """Seconds per op bucket, summed over spheres."""
        cdef ThreadedTrainingSystem* s = self.live()
        names = ("matmul", "attention", "softmax_loss", "layernorm", "gelu", "other",
                 "accumulate", "turn_wait", "optimizer")
        return {names[k]: sum(s.sphere_contexts[i].op_seconds[k]
                              for i in range(s.num_worker_spheres)) for k in range(NUM_OPS)}

    def inject_nan(self, long long step, int microbatch):
        """Test hook: poisons the gradient of one micro-batch of one step with a NaN."""
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
