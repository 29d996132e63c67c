# Faults a test can cause in an Engine of this extension: a NaN in the gradient of one
# micro-batch, and the two locks taken in the wrong order.


def inject_nan(Engine engine, long long step, long long microbatch):
    """Poisons the gradient of one micro-batch (its global index within the step) of one step
    (train_step's 0-based step index) with a NaN, at flat element gradient_size // 2."""
    cdef ThreadedTrainingSystem* s = engine.live()
    s.inject_step = step
    s.inject_microbatch = microbatch


def violate_lock_order(Engine engine):
    """Takes gradient_lock, then model_lock: the process aborts when the engine has
    debug_locks on."""
    cdef ThreadedTrainingSystem* s = engine.live()
    with nogil:
        gradient_lock_acquire(s)
        model_lock_acquire(s, False)
        model_lock_release(s)
        gradient_lock_release(s)
