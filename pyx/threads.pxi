# The ThreadedTrainingSystem: spheres (pthreads) that each run whole micro-batches, an
# ordered gradient accumulation, and the lock discipline model_lock -> gradient_lock.
from libc.stdio cimport fprintf, stderr
from libc.stdlib cimport abort
from posix.time cimport CLOCK_REALTIME


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_attr_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    ctypedef struct pthread_condattr_t:
        pass
    ctypedef struct pthread_rwlock_t:
        pass
    ctypedef struct pthread_rwlockattr_t:
        pass
    ctypedef struct pthread_barrier_t:
        pass
    ctypedef struct pthread_barrierattr_t:
        pass
    enum: PTHREAD_BARRIER_SERIAL_THREAD
    int pthread_barrier_init(pthread_barrier_t*, const pthread_barrierattr_t*, unsigned)
    int pthread_barrier_destroy(pthread_barrier_t*)
    int pthread_barrier_wait(pthread_barrier_t*)
    int pthread_create(pthread_t*, const pthread_attr_t*, void* (*)(void*) noexcept nogil, void*)
    int pthread_join(pthread_t, void**)
    int pthread_mutex_init(pthread_mutex_t*, const pthread_mutexattr_t*)
    int pthread_mutex_destroy(pthread_mutex_t*)
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)
    int pthread_cond_init(pthread_cond_t*, const pthread_condattr_t*)
    int pthread_cond_destroy(pthread_cond_t*)
    int pthread_cond_wait(pthread_cond_t*, pthread_mutex_t*)
    int pthread_cond_timedwait(pthread_cond_t*, pthread_mutex_t*, const timespec*)
    int pthread_cond_signal(pthread_cond_t*)
    int pthread_cond_broadcast(pthread_cond_t*)
    int pthread_rwlock_init(pthread_rwlock_t*, const pthread_rwlockattr_t*)
    int pthread_rwlock_destroy(pthread_rwlock_t*)
    int pthread_rwlock_rdlock(pthread_rwlock_t*)
    int pthread_rwlock_wrlock(pthread_rwlock_t*)
    int pthread_rwlock_unlock(pthread_rwlock_t*)


cdef extern from *:
    """
    /* locks the calling thread holds, for the lock-order check */
    static __thread int cllm_held_locks[2] = {0, 0};   /* model_lock, gradient_lock */
    static inline int cllm_holding(int which) { return cllm_held_locks[which]; }
    static inline void cllm_held(int which, int delta) { cllm_held_locks[which] += delta; }
    """
    int cllm_holding(int which) nogil
    void cllm_held(int which, int delta) nogil


cdef enum:
    LOCK_SHARED = 0
    LOCK_EXCLUSIVE = 1
    WORK_TRAIN = 0
    WORK_EVAL = 1
    WORK_OPTIMIZE = 2
    MODEL_LOCK = 0
    GRADIENT_LOCK = 1


cdef struct MicroBatchResult:
    double loss_sum      # summed token losses
    int counted          # targets that are not <pad>
    int sphere_id        # who computed it
    int valid            # 1 when loss and gradient are finite
    long long bad_index  # first non-finite gradient element, or -1


cdef struct StepTotals:
    double loss_sum      # summed loss, in micro-batch order
    long long tokens     # counted targets behind loss_sum
    int micro_batches    # micro-batches added up


cdef struct SphereTrainingContext:
    int sphere_id
    int symmetry_group          # sphere_id % 12, as in the original
    ThreadedTrainingSystem* system
    float* local_gradients      # (gradient_size,) cleared and filled by each micro-batch's backward
    Activations acts            # this sphere's own activations: nothing shared
    int current_microbatch
    # statistics of the valid training micro-batches this sphere computed, over all steps
    # (kept by tally_results on the main thread)
    double batch_loss           # summed loss
    long long batch_tokens      # counted targets behind batch_loss
    long long batches_processed # every training micro-batch, valid or not
    double busy_seconds
    pthread_mutex_t lock        # guards has_work / work_complete
    pthread_cond_t work_ready
    pthread_cond_t work_done
    int has_work
    int work_complete
    pthread_t thread
    int thread_started
    double profile_seconds[NUM_PROFILE_BUCKETS]  # profile, when the system's profile flag is set


cdef struct ThreadedTrainingSystem:
    ModelConfig cfg
    float* params               # (gradient_size,) owned by the Python side
    size_t gradient_size        # ALL parameters
    float* accumulated_gradients
    SphereTrainingContext* sphere_contexts
    int num_worker_spheres
    int sphere_id_counter
    # batch iterator: the current step's windows, cut into micro-batches
    const int* batch              # (batch_windows, stride) token windows
    int batch_windows
    int stride                    # window length: n + 1
    int micro_batch
    int num_microbatches
    int next_microbatch           # claimed atomically
    int work_kind                 # WORK_TRAIN or WORK_EVAL
    long long first_microbatch    # global index of micro-batch 0 (a rank's block starts later)
    float* kept_gradients         # NULL: ordered accumulation; else (num_microbatches,
                                  # kept_stride) floats, micro-batch mb's gradient in row mb
    size_t kept_stride
    int pad_id                    # targets equal to it are not counted (-1: all count)
    MicroBatchResult* results     # (max micro-batches per step,)
    int max_microbatches
    int tallied                   # the current work's results were added up (tally_results)
    int next_to_accumulate        # ordered accumulation turn; under gradient_lock
    int accumulated_any           # accumulated_gradients holds a valid micro-batch
    pthread_mutex_t gradient_lock
    pthread_cond_t accumulate_turn
    pthread_rwlock_t model_lock
    int lock_mode
    int debug_locks
    int profile
    int running
    int abort_step
    # the optimiser step, run by all spheres over fixed chunks of the flat buffer
    pthread_barrier_t batch_barrier   # between the norm and the update phases
    long long* chunks                 # (num_chunks, 3): offset, size, decay
    int num_chunks
    double* chunk_sumsq               # (num_chunks,)
    int next_chunk                    # phase 1 (mean and norm) claims chunks here
    int next_update_chunk             # phase 3 (update) here
    OptimizerSettings opt
    long long opt_count               # counted tokens behind the summed gradient
    float* opt_gradients              # the summed gradient the step applies (divided in place)
    float* adam_m
    float* adam_v
    float opt_scale                   # clipping factor
    double opt_norm
    int opt_apply
    double epoch_loss             # summed loss of the valid micro-batches of this epoch
    long long epoch_tokens        # counted targets behind epoch_loss
    long long total_batches       # training micro-batches since the start
    # --precision bf16: bf16(params), rounded when a batch is handed out; NULL for fp32
    uint16_t* bf16_weights
    # dropout of training micro-batches: threshold, scale and seed (threshold 0: none); each
    # micro-batch adds its step and its global index, first_microbatch + mb
    Dropout dropout
    # test hook: poison micro-batch inject_microbatch (global index) of the inject_step-th step
    long long step_counter
    long long inject_step
    long long inject_microbatch


# --- locks, always taken in the order model_lock -> gradient_lock ---------------------------

cdef void lock_order_violation(const char* taking, const char* holding) noexcept nogil:
    fprintf(stderr, b"cllm: lock order violation: %s taken while holding %s "
                    b"(the order is model_lock -> gradient_lock)\n", taking, holding)
    abort()


cdef inline void model_lock_acquire(ThreadedTrainingSystem* s, bint exclusive) noexcept nogil:
    if s.debug_locks and cllm_holding(GRADIENT_LOCK):
        lock_order_violation(b"model_lock", b"gradient_lock")
    if exclusive:
        pthread_rwlock_wrlock(&s.model_lock)
    else:
        pthread_rwlock_rdlock(&s.model_lock)
    cllm_held(MODEL_LOCK, 1)


cdef inline void model_lock_release(ThreadedTrainingSystem* s) noexcept nogil:
    cllm_held(MODEL_LOCK, -1)
    pthread_rwlock_unlock(&s.model_lock)


cdef inline void gradient_lock_acquire(ThreadedTrainingSystem* s) noexcept nogil:
    pthread_mutex_lock(&s.gradient_lock)
    cllm_held(GRADIENT_LOCK, 1)


cdef inline void gradient_lock_release(ThreadedTrainingSystem* s) noexcept nogil:
    cllm_held(GRADIENT_LOCK, -1)
    pthread_mutex_unlock(&s.gradient_lock)


# --- one sphere --------------------------------------------------------------------------

cdef long long validate_gradients(const float* g, size_t size) noexcept nogil:
    # index of the first NaN/Inf in g, or -1; blocks are probed first, a bad one searched
    cdef size_t i, start, end
    cdef size_t block = 4096
    start = 0
    while start < size:
        end = start + block if start + block < size else size
        if cllm_nonfinite_probe(g + start, end - start) != 0.0:
            for i in range(start, end):
                if not isfinite(g[i]):
                    return <long long>i
        start = end
    return -1


cdef void accumulate_gradients(SphereTrainingContext* ctx, int mb, const MicroBatchResult* r,
                               double* timers) noexcept nogil:
    # Adds local_gradients into accumulated_gradients in micro-batch order, whichever sphere
    # finished first.
    cdef ThreadedTrainingSystem* s = ctx.system
    cdef size_t i, size = s.gradient_size
    cdef float* acc = s.accumulated_gradients
    cdef float* loc = ctx.local_gradients
    cdef bint valid = r.valid
    cdef double t = now_seconds() if timers != NULL else 0.0
    gradient_lock_acquire(s)
    while s.next_to_accumulate != mb and not s.abort_step:
        pthread_cond_wait(&s.accumulate_turn, &s.gradient_lock)
    tock(timers, PROFILE_TURN_WAIT, &t)
    if s.abort_step:             # the step is discarded: no sum, no turn to keep
        gradient_lock_release(s)
        return
    if valid and not s.accumulated_any:
        memcpy(acc, loc, size * sizeof(float))
        s.accumulated_any = 1
    elif valid:
        for i in range(size):
            acc[i] = acc[i] + loc[i]
    if mb == s.num_microbatches - 1 and not s.accumulated_any:
        memset(acc, 0, size * sizeof(float))   # no valid micro-batch: the sum is empty
    s.next_to_accumulate += 1
    pthread_cond_broadcast(&s.accumulate_turn)
    gradient_lock_release(s)
    tock(timers, PROFILE_ACCUMULATE, &t)


cdef void sphere_process_batch(SphereTrainingContext* ctx, int mb) noexcept nogil:
    # forward + loss (+ backward, then ordered accumulation or the gradient kept in its row)
    # of micro-batch mb
    cdef ThreadedTrainingSystem* s = ctx.system
    cdef int first = mb * s.micro_batch
    cdef int B = s.batch_windows - first
    cdef int n = s.stride - 1
    cdef int counted = 0
    cdef bint train = s.work_kind == WORK_TRAIN
    cdef const int* windows = s.batch + <size_t>first * s.stride
    cdef MicroBatchResult* r = &s.results[mb]
    cdef double* timers = ctx.profile_seconds if s.profile else NULL
    cdef float* grads = ctx.local_gradients
    cdef double loss, t
    cdef Dropout drop = s.dropout
    cdef const Dropout* d = NULL
    if s.kept_gradients != NULL:
        grads = s.kept_gradients + <size_t>mb * s.kept_stride
    if B > s.micro_batch:
        B = s.micro_batch
    if train and drop.threshold:
        drop.step = s.step_counter
        drop.microbatch = s.first_microbatch + mb
        d = &drop
    ctx.current_microbatch = mb
    model_lock_acquire(s, s.lock_mode == LOCK_EXCLUSIVE)
    loss = model_forward(&ctx.acts, &counted, s.params, &s.cfg, windows, windows + 1,
                         s.stride, B, n, s.pad_id, grads if train else NULL,
                         NULL, d, timers, &s.abort_step)
    if train:
        model_backward(grads, &ctx.acts, s.params, &s.cfg, windows, s.stride, d, timers,
                       &s.abort_step)
    model_lock_release(s)
    r.loss_sum = loss
    r.counted = counted
    r.sphere_id = ctx.sphere_id
    r.valid = isfinite(loss)
    r.bad_index = -1
    if not train:
        return
    if s.step_counter == s.inject_step and s.first_microbatch + mb == s.inject_microbatch:
        grads[s.gradient_size // 2] = NAN
    t = now_seconds() if timers != NULL else 0.0
    if not cllm_load(&s.abort_step):
        r.bad_index = validate_gradients(grads, s.gradient_size)
        if r.bad_index >= 0:
            r.valid = 0
    tock(timers, PROFILE_ACCUMULATE, &t)
    if s.kept_gradients == NULL:
        accumulate_gradients(ctx, mb, r, timers)


cdef void sphere_optimizer_phase(SphereTrainingContext* ctx) noexcept nogil:
    # Every sphere takes part: (1) mean gradient and sum of squares per chunk, (2) one sphere
    # adds the chunk sums in chunk order (the norm does not depend on the thread count) and
    # sets the clipping factor, (3) AdamW/SGD update per chunk.
    cdef ThreadedTrainingSystem* s = ctx.system
    cdef double* timers = ctx.profile_seconds if s.profile else NULL
    cdef double t = now_seconds() if timers != NULL else 0.0
    cdef double sumsq
    cdef int k
    cdef const long long* c
    while True:
        k = cllm_claim(&s.next_chunk)
        if k >= s.num_chunks:
            break
        c = s.chunks + 3 * k
        s.chunk_sumsq[k] = mean_gradient_sumsq(s.opt_gradients + c[0], <size_t>c[1],
                                               s.opt_count)
    if pthread_barrier_wait(&s.batch_barrier) == PTHREAD_BARRIER_SERIAL_THREAD:
        sumsq = 0.0
        for k in range(s.num_chunks):
            sumsq += s.chunk_sumsq[k]
        s.opt_norm = sqrt(sumsq)
        s.opt_apply = isfinite(s.opt_norm)
        s.opt_scale = 1.0
        if s.opt.grad_clip > 0 and s.opt_norm > s.opt.grad_clip:
            s.opt_scale = <float>(s.opt.grad_clip / s.opt_norm)
    pthread_barrier_wait(&s.batch_barrier)
    while s.opt_apply:
        k = cllm_claim(&s.next_update_chunk)
        if k >= s.num_chunks:
            break
        c = s.chunks + 3 * k
        optimizer_update(s.params + c[0], s.opt_gradients + c[0],
                         s.adam_m + c[0] if s.opt.adamw else NULL,
                         s.adam_v + c[0] if s.opt.adamw else NULL,
                         <size_t>c[1], c[2] != 0, s.opt_scale, &s.opt)
    tock(timers, PROFILE_OPTIMIZER, &t)


cdef void* sphere_worker_thread(void* arg) noexcept nogil:
    # Waits for work: claims micro-batches in increasing order until none is left, or takes
    # its part of the optimiser step; then reports.
    cdef SphereTrainingContext* ctx = <SphereTrainingContext*>arg
    cdef ThreadedTrainingSystem* s = ctx.system
    cdef int mb
    cdef double t0
    while True:
        pthread_mutex_lock(&ctx.lock)
        while not ctx.has_work and cllm_load(&s.running):
            pthread_cond_wait(&ctx.work_ready, &ctx.lock)
        if not cllm_load(&s.running):
            pthread_mutex_unlock(&ctx.lock)
            break
        ctx.has_work = 0
        pthread_mutex_unlock(&ctx.lock)
        t0 = now_seconds()
        if s.work_kind == WORK_OPTIMIZE:
            sphere_optimizer_phase(ctx)
        else:
            while not cllm_load(&s.abort_step):
                mb = cllm_claim(&s.next_microbatch)
                if mb >= s.num_microbatches:
                    break
                sphere_process_batch(ctx, mb)
        ctx.busy_seconds += now_seconds() - t0
        pthread_mutex_lock(&ctx.lock)
        ctx.work_complete = 1
        pthread_cond_signal(&ctx.work_done)
        pthread_mutex_unlock(&ctx.lock)
    return NULL


# --- the system ----------------------------------------------------------------------------

cdef void threaded_system_destroy(ThreadedTrainingSystem* s) noexcept nogil:
    # stops and joins every started sphere, then frees everything
    cdef int i
    cdef SphereTrainingContext* ctx
    if s == NULL:
        return
    cllm_store(&s.running, 0)
    for i in range(s.num_worker_spheres):
        ctx = &s.sphere_contexts[i]
        if ctx.thread_started:
            pthread_mutex_lock(&ctx.lock)
            pthread_cond_signal(&ctx.work_ready)
            pthread_mutex_unlock(&ctx.lock)
    for i in range(s.num_worker_spheres):
        ctx = &s.sphere_contexts[i]
        if ctx.thread_started:
            pthread_join(ctx.thread, NULL)
        pthread_mutex_destroy(&ctx.lock)
        pthread_cond_destroy(&ctx.work_ready)
        pthread_cond_destroy(&ctx.work_done)
        activations_free(&ctx.acts)
        free(ctx.local_gradients)
    if s.num_worker_spheres:
        pthread_barrier_destroy(&s.batch_barrier)
    free(s.sphere_contexts)
    free(s.bf16_weights)
    free(s.accumulated_gradients)
    free(s.results)
    free(s.chunk_sumsq)
    free(s.chunks)
    pthread_mutex_destroy(&s.gradient_lock)
    pthread_cond_destroy(&s.accumulate_turn)
    pthread_rwlock_destroy(&s.model_lock)
    free(s)


cdef ThreadedTrainingSystem* threaded_system_create(ModelConfig cfg, float* params,
                                                    int num_spheres, int micro_batch,
                                                    int max_microbatches, int lock_mode,
                                                    int debug_locks, int pad_id,
                                                    bint bf16) noexcept nogil:
    # allocates the system and its spheres and starts one pthread per sphere; NULL on failure.
    # bf16: the spheres' weight products take bf16 inputs (oneDNN must be loaded)
    cdef ThreadedTrainingSystem* s = <ThreadedTrainingSystem*>calloc(1, sizeof(ThreadedTrainingSystem))
    cdef SphereTrainingContext* ctx
    cdef int i
    if s == NULL:
        return NULL
    s.cfg = cfg
    s.params = params
    s.gradient_size = model_size(&s.cfg)
    s.num_chunks = count_optimizer_chunks(&s.cfg)
    s.micro_batch = micro_batch
    s.pad_id = pad_id
    s.max_microbatches = max_microbatches
    s.lock_mode = lock_mode
    s.debug_locks = debug_locks
    s.running = 1
    s.inject_step = -1
    s.inject_microbatch = -1
    pthread_mutex_init(&s.gradient_lock, NULL)
    pthread_cond_init(&s.accumulate_turn, NULL)
    pthread_rwlock_init(&s.model_lock, NULL)
    s.accumulated_gradients = <float*>calloc(s.gradient_size, sizeof(float))
    s.results = <MicroBatchResult*>calloc(max_microbatches, sizeof(MicroBatchResult))
    s.chunks = <long long*>calloc(3 * <size_t>s.num_chunks, sizeof(long long))
    s.chunk_sumsq = <double*>calloc(s.num_chunks, sizeof(double))
    s.sphere_contexts = <SphereTrainingContext*>calloc(num_spheres, sizeof(SphereTrainingContext))
    if bf16:
        s.bf16_weights = <uint16_t*>malloc(s.gradient_size * sizeof(uint16_t))
    if (s.accumulated_gradients == NULL or s.results == NULL or s.chunks == NULL
            or s.chunk_sumsq == NULL or s.sphere_contexts == NULL
            or (bf16 and s.bf16_weights == NULL)):
        threaded_system_destroy(s)
        return NULL
    fill_in_optimizer_chunks(s.chunks, &s.cfg)
    s.num_worker_spheres = num_spheres
    pthread_barrier_init(&s.batch_barrier, NULL, num_spheres)
    for i in range(num_spheres):
        ctx = &s.sphere_contexts[i]
        pthread_mutex_init(&ctx.lock, NULL)
        pthread_cond_init(&ctx.work_ready, NULL)
        pthread_cond_init(&ctx.work_done, NULL)
    for i in range(num_spheres):
        ctx = &s.sphere_contexts[i]
        ctx.sphere_id = s.sphere_id_counter
        s.sphere_id_counter += 1
        ctx.symmetry_group = ctx.sphere_id % 12
        ctx.system = s
        ctx.local_gradients = <float*>calloc(s.gradient_size, sizeof(float))
        if ctx.local_gradients == NULL or activations_alloc(&ctx.acts, &s.cfg, micro_batch,
                                                             classifier_rows(&s.cfg, micro_batch, 0)) != 0:
            threaded_system_destroy(s)
            return NULL
        if bf16 and activations_use_bf16(&ctx.acts, &s.cfg, s.params, s.bf16_weights) != 0:
            threaded_system_destroy(s)
            return NULL
        if pthread_create(&ctx.thread, NULL, sphere_worker_thread, ctx) != 0:
            threaded_system_destroy(s)
            return NULL
        ctx.thread_started = 1
    return s


cdef void threaded_start_work(ThreadedTrainingSystem* s, int kind) noexcept nogil:
    # wakes every sphere for the work described in s (batch fields or optimiser settings)
    cdef int i
    cdef SphereTrainingContext* ctx
    s.work_kind = kind
    s.tallied = 0
    s.next_microbatch = 0
    s.next_to_accumulate = 0
    s.accumulated_any = 0
    s.next_chunk = 0
    s.next_update_chunk = 0
    s.abort_step = 0
    for i in range(s.num_worker_spheres):
        ctx = &s.sphere_contexts[i]
        pthread_mutex_lock(&ctx.lock)
        ctx.work_complete = 0
        ctx.has_work = 1
        pthread_cond_signal(&ctx.work_ready)
        pthread_mutex_unlock(&ctx.lock)


cdef void threaded_start_batch(ThreadedTrainingSystem* s, const int* windows, int num_windows,
                               int stride, int kind, long long first_microbatch,
                               float* kept, size_t kept_stride) noexcept nogil:
    # hands the spheres one global batch (training) or a set of windows (evaluation);
    # first_microbatch: the global index of its first micro-batch; kept: NULL, or where each
    # micro-batch's gradient is kept instead of being accumulated
    s.batch = windows
    s.first_microbatch = first_microbatch
    s.kept_gradients = kept
    s.kept_stride = kept_stride
    s.batch_windows = num_windows
    s.stride = stride
    s.num_microbatches = (num_windows + s.micro_batch - 1) // s.micro_batch
    if s.bf16_weights != NULL:     # the weights as the products see them, this batch
        bf16_round_rows(s.bf16_weights, s.params, 1, s.gradient_size, s.gradient_size)
    threaded_start_work(s, kind)


cdef int threaded_bf16_status(ThreadedTrainingSystem* s) noexcept nogil:
    # 0, or the first sphere's failed bf16 product status (its output was set to NaN)
    cdef int i
    cdef Bf16Products* b
    for i in range(s.num_worker_spheres):
        b = s.sphere_contexts[i].acts.bf16
        if b != NULL and b.ctx.status != 0:
            return b.ctx.status
    return 0


cdef bint threaded_wait_work(ThreadedTrainingSystem* s, double timeout) noexcept nogil:
    # True when every sphere has finished the current work, False after `timeout` seconds
    cdef timespec deadline
    cdef int i
    cdef bint done = True
    cdef SphereTrainingContext* ctx
    clock_gettime(CLOCK_REALTIME, &deadline)
    deadline.tv_sec += <long>timeout
    deadline.tv_nsec += <long>((timeout - <long>timeout) * 1e9)
    if deadline.tv_nsec >= 1000000000:
        deadline.tv_sec += 1
        deadline.tv_nsec -= 1000000000
    for i in range(s.num_worker_spheres):
        ctx = &s.sphere_contexts[i]
        pthread_mutex_lock(&ctx.lock)
        while not ctx.work_complete:
            if pthread_cond_timedwait(&ctx.work_done, &ctx.lock, &deadline) != 0:
                break
        done = done and ctx.work_complete
        pthread_mutex_unlock(&ctx.lock)
        if not done:
            return False
    return True


cdef void tally_results(ThreadedTrainingSystem* s, StepTotals* totals) noexcept nogil:
    # The one place where micro-batch results are added up, in micro-batch order, onto
    # totals; called by the main thread once the work is finished (not aborted). Training
    # counts the valid micro-batches only, and also feeds epoch_loss and each sphere's
    # statistics; evaluation counts every micro-batch (a non-finite loss shows in the sum).
    cdef int i
    cdef MicroBatchResult* r
    cdef SphereTrainingContext* ctx
    cdef bint train = s.work_kind == WORK_TRAIN
    s.tallied = 1
    for i in range(s.num_microbatches):
        r = &s.results[i]
        totals.micro_batches += 1
        if train:
            ctx = &s.sphere_contexts[r.sphere_id]     # sphere ids are the context indices
            ctx.batches_processed += 1
            s.total_batches += 1
            if not r.valid:
                continue
            ctx.batch_loss += r.loss_sum
            ctx.batch_tokens += r.counted
            s.epoch_loss += r.loss_sum
            s.epoch_tokens += r.counted
        totals.loss_sum += r.loss_sum
        totals.tokens += r.counted


cdef int threaded_optimizer_step(ThreadedTrainingSystem* s, float* gradients, long long count,
                                 float* m, float* v, const OptimizerSettings* o,
                                 double* norm) noexcept nogil:
    # Applies a summed gradient over `count` tokens (accumulated_gradients, or the sum of a
    # step shared by many processes), divided in place, with every sphere working on its
    # chunks, under model_lock (write) then gradient_lock. Returns 1 when applied, 0 when
    # skipped because the norm is not finite.
    model_lock_acquire(s, True)
    gradient_lock_acquire(s)
    s.opt = o[0]
    s.opt_count = count
    s.opt_gradients = gradients
    s.adam_m = m
    s.adam_v = v
    threaded_start_work(s, WORK_OPTIMIZE)
    while not threaded_wait_work(s, 1.0):
        pass
    norm[0] = s.opt_norm
    gradient_lock_release(s)
    model_lock_release(s)
    return s.opt_apply
