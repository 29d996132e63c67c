# The ThreadedTrainingSystem's declarations: pthreads, the structs of the system and of its
# spheres (pthreads that each run whole micro-batches), and the lock discipline
# model_lock -> gradient_lock. The spheres' work is in sphere.pxi, the system's
# operations in system.pxi.
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
    OPT_NORM = 1         # an optimiser work's phases: mean gradient and sums of squares,
    OPT_UPDATE = 2       # the update,
    OPT_WHOLE = 3        # or both with the norm in between
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
    int symmetry_group          # sphere_id % 12: a label in the per-sphere statistics, used nowhere else
    ThreadedTrainingSystem* system
    float* local_gradients      # (gradient_size,) cleared and filled by each micro-batch's backward
    Activations acts            # this sphere's own activations: nothing shared
    int current_microbatch
    # statistics of the valid training micro-batches this sphere computed, over all steps
    # (kept by tally_results on the main thread)
    double batch_loss           # summed loss
    long long batch_tokens      # counted targets behind batch_loss
    long long batches_processed  # every training micro-batch, valid or not
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
    float* params               # the model's parameters, owned by the Python side
    Lora lora                   # the adapters (lora.params NULL: none, the parameters train)
    float* trained              # what the optimiser updates: params, or lora.params
    size_t gradient_size        # floats of trained: every parameter, or every adapter
    float* accumulated_gradients
    SphereTrainingContext* sphere_contexts
    int num_worker_spheres
    int sphere_id_counter
    # batch iterator: the current step's windows, cut into micro-batches
    const int* batch              # (batch_windows, stride) token windows
    int batch_windows
    int stride                    # window length: n + 1, or 2 (n + 1) when labelled
    # 1: each window is n + 1 token ids followed by their n + 1 labels, and position k's
    # target is label k + 1 (negative ones not counted); 0: the targets are the ids shifted
    int labelled
    int micro_batch
    int num_microbatches
    int next_microbatch           # claimed atomically
    int work_kind                 # WORK_TRAIN or WORK_EVAL
    long long first_microbatch    # global index of micro-batch 0 (a rank's block starts later)
    # NULL: ordered accumulation; else (num_microbatches, kept_stride) floats, micro-batch
    # mb's gradient in row mb
    float* kept_gradients
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
    int opt_phase                     # OPT_NORM, OPT_UPDATE or OPT_WHOLE
    int opt_first_chunk               # the work covers chunks [opt_first_chunk, opt_end_chunk):
    int opt_end_chunk                 # all of them in one process, a rank's share on many
    size_t opt_base                   # offset in trained of opt_gradients[0], adam_m[0], adam_v[0]
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
    long long step_counter            # the 0-based index of the step handed out
    # the testing extension's inject_nan: poison micro-batch inject_microbatch (global index)
    # of step inject_step (read only where CLLM_TESTING is 1)
    long long inject_step
    long long inject_microbatch


cdef extern from *:
    """
    /* 1 in cllm_cli._engine_testing (testing/engine_testing.pyx defines it first), else 0: the
       sphere's fault injection is compiled into the testing extension only. */
    #ifndef CLLM_TESTING
    #define CLLM_TESTING 0
    #endif
    """
    enum: CLLM_TESTING


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
