# The training engine seen from Python: BadMicroBatch, StepResult and Engine, which owns
# a ThreadedTrainingSystem.
from cpython.exc cimport PyErr_CheckSignals


cdef class BadMicroBatch:
    """A micro-batch left out of a step because its loss or gradient is not finite."""
    cdef readonly long long step     # the step index given to train_step
    cdef readonly int index          # micro-batch index within the step
    cdef readonly int sphere         # the sphere that computed it
    cdef readonly bint loss_finite
    cdef readonly object tensor      # name (layout order) of the first non-finite gradient's tensor, or None

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
    cdef object adapters_ref    # and the adapters'
    cdef object work_ref        # keeps the current windows alive while spheres read them
    cdef object layout          # [(name, shape, offset)] of the trained buffer
    cdef readonly int num_spheres, micro_batch, max_windows, pad_id
    cdef readonly bint labelled

    def __init__(self, cfg, float[::1] params, int num_spheres, int micro_batch,
                 int max_windows, str lock_mode="shared", bint debug_locks=False,
                 int pad_id=0, double dropout=0.0, unsigned long long seed=0,
                 str precision="fp32", float[::1] adapters=None, lora=None,
                 bint labelled=False, str matmul="blas"):
        """cfg: the model config (CLLMConfig); params: its flat buffer, updated in place by the
        optimiser; max_windows: the most windows one call hands the spheres; pad_id: targets
        equal to it are not counted (-1: every target counts); dropout: its probability in
        training steps (never in evaluate), masks keyed by seed, step and micro-batch;
        precision: "fp32", or "bf16" (every matrix product on bf16 inputs; load_bf16 first).
        lora: None, or (rank, targets, alpha, dropout) of `adapters` (adapter_layout): then
        the optimiser updates the adapters, and params stay frozen; gradients, optimiser
        state and kept rows are the adapters' size (gradient_size).
        labelled: every window handed over is 2 (n + 1) ints, n + 1 token ids followed by
        their labels, as transformers' labels: position k is trained on label k + 1, and a
        negative label (IGNORE_TARGET) or pad_id is not counted; otherwise a window is n + 1
        ids and the targets are the ids shifted by one.
        matmul: the kernel of the fp32 weight products, "blas" (scipy's BLAS) or "onednn"
        (oneDNN's fp32 matmul; load_bf16 first); every kernel gives its own bits, the same
        for any sphere count."""
        cdef ModelConfig c = model_config(cfg)
        cdef Lora lo
        cdef Lora* lora_ptr = NULL
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
        cdef bint onednn_fp32 = check_matmul(matmul, bf16)
        if lora is not None:
            bind_lora(&lo, &c, lora, adapters)
            lora_ptr = &lo
            self.layout = adapter_layout(cfg, lora[0], lora[1])
        else:
            self.layout = parameter_layout(cfg)
        self.cfg = cfg
        self.params_ref = params
        self.adapters_ref = adapters
        self.num_spheres = num_spheres
        self.micro_batch = micro_batch
        self.max_windows = max_windows
        self.pad_id = pad_id
        self.labelled = labelled
        cdef int mode = LOCK_EXCLUSIVE if lock_mode == "exclusive" else LOCK_SHARED
        cdef int max_mb = (max_windows + micro_batch - 1) // micro_batch
        with nogil:
            self.system = threaded_system_create(c, &params[0], num_spheres, micro_batch, max_mb,
                                                 mode, debug_locks, pad_id, labelled, bf16,
                                                 onednn_fp32, lora_ptr)
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
        cdef int width = stride // 2 if s.labelled else stride
        cdef int n_micro = (nw + s.micro_batch - 1) // s.micro_batch
        cdef float[:, :] rows = None
        cdef float* kept_start = NULL
        cdef size_t kept_stride = 0
        if nw < 1 or n_micro > s.max_microbatches:
            raise ValueError(f"cannot run {nw} windows at once")
        if width < 2 or width - 1 > s.cfg.T or (s.labelled and stride % 2):
            raise ValueError(f"windows must hold 2..{s.cfg.T + 1} tokens"
                             + (" and as many labels" if s.labelled else ""))
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
        if s.labelled:
            halves = np.asarray(windows)
            _check_tokens(np.ascontiguousarray(halves[:, :width]), s.cfg.V, "windows")
            _check_labels(np.ascontiguousarray(halves[:, width:]), s.cfg.V)
        else:
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
        the 0-based step index (reports, dropout; the testing extension's inject_nan).
        should_stop: a callable asked between waits; when it returns True the step is
        abandoned and StepAborted raised.
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
        results = self.results()
        loss_sum, tokens, bad = self.sum_results(step, results)
        norm, applied = math.nan, False
        if tokens:
            norm, applied = self.optimizer_step(tokens, adam_m, adam_v, adamw=adamw, lr=lr,
                                                weight_decay=weight_decay,
                                                grad_clip=grad_clip, t=t)
        return StepResult(loss_sum, tokens, len(results), norm, applied, bad)

    def sum_results(self, long long step, list results):
        """(loss_sum, tokens, bad) of a training step's `results`, one (loss_sum, counted,
        sphere, valid, bad_index) per micro-batch in micro-batch order (of one process, or
        gathered from every rank of many): the valid ones added up in order, the others
        reported as BadMicroBatch. The optimiser runs when tokens > 0."""
        cdef double loss_sum = 0.0
        cdef long long tokens = 0
        bad = []
        for index, (loss, counted, sphere, valid, bad_index) in enumerate(results):
            if not valid:
                bad.append(BadMicroBatch(step, index, sphere, isfinite(loss),
                                         self.tensor_at(bad_index)
                                         if bad_index >= 0 else None))
                continue
            loss_sum += loss
            tokens += counted
        return loss_sum, tokens, bad

    @property
    def gradient_size(self):
        """Floats of the gradient, of the optimiser state and of a kept row: the
        parameters', or the adapters' when adapters are trained."""
        return self.live().gradient_size

    def tensor_at(self, index):
        """Name of the trained tensor (a parameter, or an adapter) holding element `index`
        of the gradient."""
        for name, shape, offset in self.layout:
            if index < offset + math.prod(shape):
                return name
        raise IndexError(f"element {index} is outside the {self.gradient_size} trained values")

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

    # -- the step in parts (a rank of a many-process run: cllm_cli/distributed/) --------------

    def start(self, const int[:, ::1] windows, bint train, long long step=0,
              long long first_microbatch=0, kept_gradients=None):
        """Hands the spheres windows (num_windows, n + 1): a training step or an evaluation.
        first_microbatch: the global index, within the step, of the windows' first
        micro-batch (a rank of a many-process run hands its block; the testing extension's
        inject_nan counts in global indices). kept_gradients: None (the gradients are
        accumulated in order), or float32 rows (at least one per micro-batch, each of
        gradient_size floats, C order within a row) that receive each micro-batch's gradient,
        unsummed."""
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
                       double beta1=0.9, double beta2=0.95, double eps=1e-8):
        """Applies the accumulated gradient divided by count (in place). Returns
        (grad_norm, applied)."""
        cdef ThreadedTrainingSystem* s = self.live()
        cdef OptimizerSettings o
        cdef double norm = 0.0
        cdef int applied
        if count < 1:
            raise ValueError("count must be >= 1")
        if adamw and (m.shape[0] != s.gradient_size or v.shape[0] != s.gradient_size):
            raise ValueError("optimizer state does not match the parameters")
        optimizer_settings(&o, adamw, lr, weight_decay, grad_clip, beta1, beta2, eps, t)
        with nogil:
            applied = threaded_optimizer_work(s, OPT_WHOLE, 0, s.num_chunks,
                                              s.accumulated_gradients, count,
                                              &m[0] if adamw else NULL,
                                              &v[0] if adamw else NULL, &o, NULL, &norm)
        return norm, bool(applied)

    # -- the optimiser step on a share of the chunks (a rank of many processes) -------------

    def mean_gradient_sumsq(self, float[::1] gradients, long long count, int first_chunk,
                            int end_chunk):
        """The first half of optimizer_step over chunks [first_chunk, end_chunk) of the
        trained buffer (optimizer_chunks), a rank's share: `gradients`, the step's summed
        gradient over those chunks (their floats from the first one's offset on), is divided
        by count in place. Returns each chunk's sum of squares of the result (float64, one
        per chunk), as optimizer_step computes it."""
        cdef ThreadedTrainingSystem* s = self.live()
        cdef OptimizerSettings o
        cdef double norm = 0.0
        cdef float* g = NULL
        if count < 1:
            raise ValueError("count must be >= 1")
        if gradients.shape[0] != self.check_chunks(first_chunk, end_chunk):
            raise ValueError("gradients do not match the chunks")
        if gradients.shape[0]:
            g = &gradients[0]
        optimizer_settings(&o, False, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1)
        with nogil:
            threaded_optimizer_work(s, OPT_NORM, first_chunk, end_chunk, g, count, NULL,
                                    NULL, &o, NULL, &norm)
        out = np.empty(end_chunk - first_chunk, dtype=np.float64)
        cdef double[::1] sums = out
        if end_chunk > first_chunk:
            memcpy(&sums[0], s.chunk_sumsq + first_chunk,
                   (end_chunk - first_chunk) * sizeof(double))
        return out

    def optimizer_update(self, float[::1] gradients, float[::1] m, float[::1] v,
                         int first_chunk, int end_chunk, const double[::1] chunk_sumsq, *,
                         bint adamw, double lr, double weight_decay, double grad_clip,
                         long long t, double beta1=0.9, double beta2=0.95, double eps=1e-8):
        """The second half of optimizer_step over chunks [first_chunk, end_chunk): the mean
        gradient's norm from chunk_sumsq (every chunk's sum of squares, as
        mean_gradient_sumsq returned them on each share, in chunk order), the clipping
        factor, then AdamW (m, v: those chunks' moments, updated in place) or SGD on the
        trained values of the chunks with `gradients` (divided by mean_gradient_sumsq).
        Nothing changes when the norm is not finite. Returns (grad_norm, applied), the same
        on every share."""
        cdef ThreadedTrainingSystem* s = self.live()
        cdef OptimizerSettings o
        cdef double norm = 0.0
        cdef int applied
        cdef size_t span = self.check_chunks(first_chunk, end_chunk)
        cdef float* g = NULL
        cdef float* mp = NULL
        cdef float* vp = NULL
        if gradients.shape[0] != span:
            raise ValueError("gradients do not match the chunks")
        if adamw and (m.shape[0] != span or v.shape[0] != span):
            raise ValueError("optimizer state does not match the chunks")
        if chunk_sumsq.shape[0] != s.num_chunks:
            raise ValueError(f"chunk_sumsq must hold all {s.num_chunks} chunks' sums")
        if span:
            g = &gradients[0]
            if adamw:
                mp, vp = &m[0], &v[0]
        optimizer_settings(&o, adamw, lr, weight_decay, grad_clip, beta1, beta2, eps, t)
        with nogil:
            applied = threaded_optimizer_work(s, OPT_UPDATE, first_chunk, end_chunk, g, 1, mp,
                                              vp, &o, &chunk_sumsq[0], &norm)
        return norm, bool(applied)

    cdef size_t check_chunks(self, int first_chunk, int end_chunk) except? 0:
        # floats of chunks [first_chunk, end_chunk), which must lie within the table
        cdef ThreadedTrainingSystem* s = self.live()
        cdef const long long* last
        if not 0 <= first_chunk <= end_chunk <= s.num_chunks:
            raise ValueError(f"chunks [{first_chunk}, {end_chunk}) are not within the "
                             f"{s.num_chunks} optimiser chunks")
        if first_chunk == end_chunk:
            return 0
        last = s.chunks + 3 * (end_chunk - 1)
        return <size_t>(last[0] + last[1] - s.chunks[3 * first_chunk])

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
