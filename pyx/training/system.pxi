# The ThreadedTrainingSystem as a whole: create and destroy, hand out work, wait for it, add
# up the results and run the optimiser step.

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


cdef inline const Lora* trained_lora(const ThreadedTrainingSystem* s) noexcept nogil:
    # the adapters the system trains, or NULL when it trains the parameters
    return &s.lora if s.lora.params != NULL else NULL


cdef ThreadedTrainingSystem* threaded_system_create(ModelConfig cfg, float* params,
                                                    int num_spheres, int micro_batch,
                                                    int max_microbatches, int lock_mode,
                                                    int debug_locks, int pad_id,
                                                    bint labelled, bint bf16,
                                                    bint onednn_fp32,
                                                    const Lora* lora) noexcept nogil:
    # allocates the system and its spheres and starts one pthread per sphere; NULL on failure.
    # bf16: the spheres' weight products take bf16 inputs (oneDNN must be loaded);
    # onednn_fp32: they run on oneDNN's fp32 matmul instead of the BLAS (oneDNN loaded too);
    # lora: NULL, or adapters to train while params stay frozen
    cdef ThreadedTrainingSystem* s = <ThreadedTrainingSystem*>calloc(1, sizeof(ThreadedTrainingSystem))
    cdef SphereTrainingContext* ctx
    cdef int i
    if s == NULL:
        return NULL
    s.cfg = cfg
    s.params = params
    s.trained = params
    s.gradient_size = model_size(&s.cfg)
    if lora != NULL:
        s.lora = lora[0]
        s.trained = s.lora.params
        s.gradient_size = lora_size(&s.lora, &s.cfg)
    s.num_chunks = count_optimizer_chunks(&s.cfg, trained_lora(s))
    s.micro_batch = micro_batch
    s.pad_id = pad_id
    s.labelled = labelled
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
        s.bf16_weights = <uint16_t*>malloc(model_size(&s.cfg) * sizeof(uint16_t))
    if (s.accumulated_gradients == NULL or s.results == NULL or s.chunks == NULL
            or s.chunk_sumsq == NULL or s.sphere_contexts == NULL
            or (bf16 and s.bf16_weights == NULL)):
        threaded_system_destroy(s)
        return NULL
    fill_in_optimizer_chunks(s.chunks, &s.cfg, trained_lora(s))
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
        if ctx.local_gradients == NULL or activations_alloc(
                &ctx.acts, &s.cfg, micro_batch, classifier_rows(&s.cfg, micro_batch, 0)) != 0:
            threaded_system_destroy(s)
            return NULL
        if bf16 and activations_use_bf16(&ctx.acts, &s.cfg, s.params, s.bf16_weights) != 0:
            threaded_system_destroy(s)
            return NULL
        if onednn_fp32 and activations_use_onednn_fp32(&ctx.acts) != 0:
            threaded_system_destroy(s)
            return NULL
        if lora != NULL and activations_use_lora(&ctx.acts, &s.cfg, &s.lora) != 0:
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
        bf16_round_rows(s.bf16_weights, s.params, 1, model_size(&s.cfg), model_size(&s.cfg))
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


cdef int threaded_optimizer_work(ThreadedTrainingSystem* s, int phase, int first_chunk,
                                 int end_chunk, float* gradients, long long count, float* m,
                                 float* v, const OptimizerSettings* o,
                                 const double* chunk_sumsq, double* norm) noexcept nogil:
    # An optimiser work over chunks [first_chunk, end_chunk) of the trained buffer, every
    # sphere working on its chunks, under model_lock (write) then gradient_lock. gradients
    # (the summed gradient over `count` tokens, divided in place), m and v hold those
    # chunks' floats from the first one's offset on.
    # OPT_WHOLE: the whole step; returns 1 when applied, 0 when skipped because the norm is
    # not finite. OPT_NORM: the mean gradient and each chunk's sum of squares (into
    # s.chunk_sumsq); returns 0. OPT_UPDATE: the norm and clipping factor from chunk_sumsq
    # (every chunk's sum of squares), then the update when the norm is finite; returns 1
    # when applied.
    cdef int applied = 0
    model_lock_acquire(s, True)
    gradient_lock_acquire(s)
    s.opt = o[0]
    s.opt_phase = phase
    s.opt_first_chunk = first_chunk
    s.opt_end_chunk = end_chunk
    s.opt_base = <size_t>s.chunks[3 * first_chunk] if first_chunk < s.num_chunks else 0
    s.opt_count = count
    s.opt_gradients = gradients
    s.adam_m = m
    s.adam_v = v
    if phase == OPT_UPDATE:
        memcpy(s.chunk_sumsq, chunk_sumsq, s.num_chunks * sizeof(double))
        s.opt_apply = optimizer_clip(s.chunk_sumsq, s.num_chunks, o.grad_clip, &s.opt_norm,
                                     &s.opt_scale)
    if first_chunk < end_chunk or phase == OPT_WHOLE:
        threaded_start_work(s, WORK_OPTIMIZE)
        while not threaded_wait_work(s, 1.0):
            pass
    if phase != OPT_NORM:
        norm[0] = s.opt_norm
        applied = s.opt_apply
    gradient_lock_release(s)
    model_lock_release(s)
    return applied
