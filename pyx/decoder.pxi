# Generation seen from Python: Decoder, one sequence with a key/value cache.


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
