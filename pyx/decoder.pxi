# Generation seen from Python: Decoder, one sequence with a key/value cache.


cdef class Decoder:
    """Generation with a key/value cache. prefill(tokens) runs a prompt as one batched pass
    and feed(token) one more position; each fills the cache and returns the logits of the last
    position. A position's matrix-vector products are split by output rows over `threads`
    threads; the logits are the same bits for any thread count. Holds up to seq_len positions
    (a sliding window shifts every position, which makes the cache useless: reset() and
    prefill the window again)."""
    cdef DecodeCache cache
    cdef ModelConfig c
    cdef object params_ref      # keeps the parameter buffer alive
    cdef readonly int threads
    cdef bint ready

    def __cinit__(self):
        self.ready = False

    def __init__(self, cfg, float[::1] params, int threads=1):
        self.c = model_config(cfg)
        if params.shape[0] != model_size(&self.c):
            raise ValueError("parameter buffer does not match the config")
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.params_ref = params
        self.threads = threads
        cdef int status
        with nogil:
            status = decode_cache_alloc(&self.cache, &self.c, &params[0], threads)
        if status == -1:
            raise MemoryError("cannot allocate the key/value cache")
        if status != 0:
            raise RuntimeError(f"cannot start {threads} decoding threads")
        self.ready = True

    def __dealloc__(self):
        if self.ready:
            with nogil:
                decode_cache_free(&self.cache)
            self.ready = False

    @property
    def length(self):
        """Positions in the cache."""
        return self.cache.n

    def reset(self):
        """Empties the cache."""
        self.cache.n = 0

    cdef object last_logits(self):
        out = np.empty(self.c.V, dtype=np.float32)
        cdef float[::1] o = out
        memcpy(&o[0], self.cache.logits, self.c.V * sizeof(float))
        return out

    def feed(self, int token):
        """float32 [V]: the logits after `token` at the next position."""
        if self.cache.n >= self.c.T:
            raise ValueError(f"the cache is full ({self.c.T} positions)")
        if not 0 <= token < self.c.V:
            raise ValueError(f"token {token} is outside [0, {self.c.V})")
        with nogil:
            decode_forward(&self.cache, token)
        return self.last_logits()

    def prefill(self, tokens):
        """float32 [V]: the logits after the last of `tokens` (one or more ids), which take
        the next positions, run as one batched pass."""
        cdef int[::1] ids = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        cdef int n = ids.shape[0]
        if n < 1:
            raise ValueError("prefill needs at least one token")
        if self.cache.n + n > self.c.T:
            raise ValueError(f"the cache is full ({self.c.T} positions): {self.cache.n} cached, "
                             f"{n} more given")
        _check_tokens(np.asarray(ids).reshape(1, -1), self.c.V, "tokens")
        with nogil:
            decode_prefill(&self.cache, &ids[0], n)
        return self.last_logits()
