# One pass without an Engine: the loss and gradient, or the logits, of one micro-batch
# (tests and evaluation).


def loss_and_grads(cfg, const float[::1] params,                # IN
                   const int[:, ::1] inputs,                     # IN  (B, n)
                   const int[:, ::1] targets,                    # IN  (B, n)
                   float[::1] grads,                             # OUT (overwritten)
                   int pad_id=0, int block_rows=0, double dropout=0.0,
                   unsigned long long seed=0, long long step=0, long long microbatch=0,
                   str precision="fp32", float[::1] adapters=None, lora=None,
                   str matmul="blas"):
    """Summed loss over the targets that are neither negative (IGNORE_TARGET) nor pad_id
    (-1: every id counts) and its gradient, written
    into grads; returns (loss_sum, counted). block_rows: rows per block of the
    classifier and the loss (0: the engine's choice, classifier_block_rows). With dropout > 0
    (or the adapters' dropout) the inputs are one training micro-batch: the masks of (seed,
    step, microbatch). precision: as Engine's. lora: None, or (rank, targets, alpha, dropout)
    of `adapters`; then the parameters are frozen and grads is the adapters' gradient.
    matmul: the kernel of the fp32 weight products, as Engine's."""
    cdef ModelConfig c = model_config(cfg)
    cdef Activations acts
    cdef Lora lo
    cdef Dropout d
    dropout_settings(&d, dropout, seed)
    d.step = step
    d.microbatch = microbatch
    cdef int B = inputs.shape[0], n = inputs.shape[1], counted = 0
    cdef double loss
    if targets.shape[0] != B or targets.shape[1] != n:
        raise ValueError("inputs and targets must have the same shape")
    if n < 1 or n > c.T or B < 1:
        raise ValueError(f"sequence length must be 1..{c.T}, got {n}")
    if params.shape[0] != model_size(&c):
        raise ValueError("parameter buffer does not match the config")
    if grads.shape[0] != (adapters.shape[0] if lora is not None and adapters is not None
                          else model_size(&c)):
        raise ValueError("gradient buffer does not match what is trained")
    check_pad_id(pad_id, c.V)
    _check_tokens(inputs, c.V, "inputs")
    _check_labels(targets, c.V)
    if block_rows < 0:
        raise ValueError("block_rows must be >= 0")
    cdef bint bf16 = check_precision(precision)
    cdef bint onednn_fp32 = check_matmul(matmul, bf16)
    cdef _Bf16Weights w = _Bf16Weights()
    if activations_alloc(&acts, &c, B, classifier_rows(&c, B, block_rows)) != 0:
        raise MemoryError("cannot allocate activations")
    use_precision(&acts, &c, &params[0], w, bf16, onednn_fp32)
    use_lora(&acts, &c, &lo, lora, adapters)
    with nogil:
        loss = model_forward(&acts, &counted, <float*>&params[0], &c, &inputs[0, 0],
                             &targets[0, 0], n, B, n, pad_id, &grads[0], NULL, &d, NULL,
                             NULL)
        model_backward(&grads[0], &acts, <float*>&params[0], &c, &inputs[0, 0], n, &d, NULL,
                       NULL)
    cdef int status = acts.bf16.ctx.status if acts.bf16 != NULL else 0
    activations_free(&acts)
    check_products(status)
    return loss, counted


def forward_logits(cfg, const float[::1] params,                # IN
                   const int[:, ::1] inputs,                     # IN  (B, n)
                   float[:, :, ::1] logits,                      # OUT (B, n, V)
                   str precision="fp32", float[::1] adapters=None, lora=None):
    """logits of every position; lora: None, or (rank, targets, alpha, dropout) of
    `adapters`, applied as they are (no dropout)."""
    cdef ModelConfig c = model_config(cfg)
    cdef Lora lo
    cdef Activations acts
    cdef int B = inputs.shape[0], n = inputs.shape[1], counted = 0
    if n < 1 or n > c.T or B < 1:
        raise ValueError(f"sequence length must be 1..{c.T}, got {n}")
    if params.shape[0] != model_size(&c):
        raise ValueError("parameter buffer does not match the config")
    if logits.shape[0] != B or logits.shape[1] != n or logits.shape[2] != c.V:
        raise ValueError("logits buffer has the wrong shape")
    _check_tokens(inputs, c.V, "inputs")
    cdef bint bf16 = check_precision(precision)
    cdef _Bf16Weights w = _Bf16Weights()
    if activations_alloc(&acts, &c, B, classifier_rows(&c, B, 0)) != 0:
        raise MemoryError("cannot allocate activations")
    use_precision(&acts, &c, &params[0], w, bf16)
    use_lora(&acts, &c, &lo, lora, adapters)
    with nogil:
        model_forward(&acts, &counted, <float*>&params[0], &c, &inputs[0, 0], NULL, n, B, n,
                      -1, NULL, &logits[0, 0, 0], NULL, NULL, NULL)
    cdef int status = acts.bf16.ctx.status if acts.bf16 != NULL else 0
    activations_free(&acts)
    check_products(status)
