# One sphere's work: a micro-batch's forward + backward, its ordered accumulation, its share
# of the optimiser step, and the pthread loop that waits for work.

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
    # finished first. The first valid gradient is not copied: the two buffers trade places
    # (the sphere's next forward pass clears its new local buffer).
    cdef ThreadedTrainingSystem* s = ctx.system
    cdef size_t i, size = s.gradient_size
    cdef float* acc
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
    acc = s.accumulated_gradients
    if valid and not s.accumulated_any:
        s.accumulated_gradients = loc
        ctx.local_gradients = acc
        acc = loc
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
    cdef int n = (s.stride // 2 if s.labelled else s.stride) - 1
    cdef int counted = 0
    cdef bint train = s.work_kind == WORK_TRAIN
    cdef const int* windows = s.batch + <size_t>first * s.stride
    cdef const int* targets = windows + (n + 2 if s.labelled else 1)
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
    if train and (drop.threshold or s.lora.drop_threshold):
        drop.step = s.step_counter
        drop.microbatch = s.first_microbatch + mb
        d = &drop
    ctx.current_microbatch = mb
    model_lock_acquire(s, s.lock_mode == LOCK_EXCLUSIVE)
    loss = model_forward(&ctx.acts, &counted, s.params, &s.cfg, windows, targets,
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
    # compiled into the testing extension only: CLLM_TESTING is 0 in the production one
    if (CLLM_TESTING and s.step_counter == s.inject_step
            and s.first_microbatch + mb == s.inject_microbatch):
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
    # Every sphere takes part, over chunks [opt_first_chunk, opt_end_chunk): (1) mean gradient
    # and sum of squares per chunk, (2) in a whole step, one sphere adds the chunk sums in
    # chunk order (the norm does not depend on the thread count) and sets the clipping
    # factor, (3) AdamW/SGD update per chunk. A rank of many processes runs (1) and (3) on
    # its share as two works; (2) runs on the main thread in between, over every rank's sums.
    cdef ThreadedTrainingSystem* s = ctx.system
    cdef double* timers = ctx.profile_seconds if s.profile else NULL
    cdef double t = now_seconds() if timers != NULL else 0.0
    cdef int k
    cdef size_t at
    cdef const long long* c
    while s.opt_phase & OPT_NORM:
        k = s.opt_first_chunk + cllm_claim(&s.next_chunk)
        if k >= s.opt_end_chunk:
            break
        c = s.chunks + 3 * k
        s.chunk_sumsq[k] = mean_gradient_sumsq(s.opt_gradients + (c[0] - s.opt_base),
                                               <size_t>c[1], s.opt_count)
    if s.opt_phase == OPT_WHOLE:
        if pthread_barrier_wait(&s.batch_barrier) == PTHREAD_BARRIER_SERIAL_THREAD:
            s.opt_apply = optimizer_clip(s.chunk_sumsq, s.num_chunks, s.opt.grad_clip,
                                         &s.opt_norm, &s.opt_scale)
        pthread_barrier_wait(&s.batch_barrier)
    while s.opt_phase & OPT_UPDATE and s.opt_apply:
        k = s.opt_first_chunk + cllm_claim(&s.next_update_chunk)
        if k >= s.opt_end_chunk:
            break
        c = s.chunks + 3 * k
        at = c[0] - s.opt_base
        optimizer_update(s.trained + c[0], s.opt_gradients + at,
                         s.adam_m + at if s.opt.adamw else NULL,
                         s.adam_v + at if s.opt.adamw else NULL,
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
