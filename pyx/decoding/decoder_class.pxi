# Generation seen from Python: Decoder, one sequence with a key/value cache.


cdef class Decoder:
    """Generation with a key/value cache. prefill(tokens) runs a prompt as one batched pass
    and feed(token) one more position; each fills the cache and returns the logits of the last
    position. score(tokens, targets) runs a batched pass too and returns the log-probabilities
    of given targets instead; truncate(n) cuts the cache back to its first n positions, so that
    several continuations of one context reuse its cached positions. A position's
    matrix-vector products are split by output rows over `threads` threads; the logits and the
    log-probabilities are the same bits for any thread count. Holds up to seq_len positions
    (a sliding window shifts every position, which makes the cache useless: reset() and
    prefill the window again)."""
    cdef DecodeCache cache
    cdef ModelConfig c
    cdef object params_ref      # keeps the parameter buffer alive
    cdef _Bf16Weights bf16      # bf16(params) for precision bf16
    cdef readonly int threads
    cdef readonly str precision
    cdef bint ready

    def __cinit__(self):
        self.ready = False

    def __init__(self, cfg, float[::1] params, int threads=1, str precision="fp32"):
        """precision: "fp32", or "bf16": every product with a weight on the weights' bf16
        copy (half the bytes to read per token) and bf16-rounded inputs, with fp32 sums; the
        attention and everything else stay fp32 (load_bf16 first: prefill's products run on
        oneDNN)."""
        self.c = model_config(cfg)
        if params.shape[0] != model_size(&self.c):
            raise ValueError("parameter buffer does not match the config")
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        cdef bint bf16 = check_precision(precision)
        cdef size_t size = model_size(&self.c)
        self.params_ref = params
        self.threads = threads
        self.precision = precision
        self.bf16 = _Bf16Weights()
        if bf16:
            self.bf16.data = <uint16_t*>malloc(size * sizeof(uint16_t))
            if self.bf16.data == NULL:
                raise MemoryError("cannot allocate the bf16 weights")
            with nogil:
                bf16_round_rows(self.bf16.data, &params[0], 1, size, size)
        cdef int status
        with nogil:
            status = decode_cache_alloc(&self.cache, &self.c, &params[0], threads,
                                        self.bf16.data)
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

    def truncate(self, int length):
        """Keeps the first `length` cached positions (0 <= length <= self.length) and forgets
        the others: the next prefill, score or feed continues at position `length`."""
        if not 0 <= length <= self.cache.n:
            raise ValueError(f"cannot truncate {self.cache.n} cached positions to {length}")
        self.cache.n = length

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
        check_products(decode_products_status(&self.cache))
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
        check_products(decode_products_status(&self.cache))
        return self.last_logits()

    def score(self, tokens, targets):
        """(logp float64 [k], greedy bool [k]) for the k = len(targets) <= len(tokens) last of
        `tokens`, which take the next positions as in prefill: logp[i] is the log-probability,
        log softmax of the logits over the whole vocabulary, of targets[i] at the position of
        tokens[n - k + i], and greedy[i] says whether targets[i] is the (first) argmax of those
        logits. The classifier runs on those k positions only (none when k is 0: the tokens
        only fill the cache). Does not change what prefill and feed returned last."""
        cdef int[::1] ids = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        cdef int[::1] tgt = np.ascontiguousarray(targets, dtype=np.int32).reshape(-1)
        cdef int n = ids.shape[0], k = tgt.shape[0]
        if n < 1:
            raise ValueError("score needs at least one token")
        if self.precision != "fp32":
            raise ValueError("scoring runs in fp32: make the Decoder with precision 'fp32'")
        if k > n:
            raise ValueError(f"{k} targets for {n} tokens: at most one target per token")
        if self.cache.n + n > self.c.T:
            raise ValueError(f"the cache is full ({self.c.T} positions): {self.cache.n} cached, "
                             f"{n} more given")
        _check_tokens(np.asarray(ids).reshape(1, -1), self.c.V, "tokens")
        _check_tokens(np.asarray(tgt).reshape(1, -1), self.c.V, "targets")
        if k and self.cache.slogits == NULL:
            self.cache.slogits = <float*>malloc(<size_t>SCORE_ROWS * self.c.V * sizeof(float))
            if self.cache.slogits == NULL:
                raise MemoryError("cannot allocate the logits of the scored rows")
        logp = np.zeros(k, dtype=np.float64)
        greedy = np.zeros(k, dtype=np.uint8)
        cdef double[::1] lp = logp
        cdef unsigned char[::1] gr = greedy
        cdef int* tp = &tgt[0] if k else NULL
        cdef double* lpp = &lp[0] if k else NULL
        cdef unsigned char* grp = &gr[0] if k else NULL
        with nogil:
            decode_score(&self.cache, &ids[0], n, tp, k, lpp, grp)
        return logp, greedy.astype(bool)
