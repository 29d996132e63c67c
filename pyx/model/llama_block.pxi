# The Llama form's block, forward and backward (the model around it: forward_backward.pxi).
#   u = rmsnorm_1(x);  x = x + o_proj(attention(rope(q_proj(u)), rope(k_proj(u)), v_proj(u)))
#   u = rmsnorm_2(x);  x = x + down_proj(silu(gate_proj(u)) * up_proj(u))
# q, k and v come out of one product (their weights follow each other in the buffer), and so
# do gate and up. Dropout, where asked for, drops the attention probabilities only (the
# Llama form's attention_dropout).


cdef inline void norm_forward(const ModelConfig* c, float* out, float* mean, float* rstd,
                              const float* x, const float* weight, const float* bias,
                              int N) noexcept nogil:
    # the family's norm of N rows: GPT-2's layer norm (mean, rstd kept), Llama's RMSNorm (rstd
    # kept; no mean, no bias)
    if c.family == FAMILY_LLAMA:
        rmsnorm_forward(out, rstd, x, weight, N, c.C, c.norm_eps)
    else:
        layernorm_forward(out, mean, rstd, x, weight, bias, N, c.C)


cdef inline void llama_adapters_forward(LayerActs* a, const ModelConfig* c, float* y, int ldy,
                                        const float* x, int N, const Dropout* d, int l,
                                        int first, int last) noexcept nogil:
    # the adapters of sites first .. last whose outputs are columns of y (rows ldy apart)
    cdef int site
    for site in range(first, last + 1):
        if lora_on(a.lora, site):
            lora_forward(a.lora, c, y + site_column(c, site), ldy, site_h(a, site, N), a.lora_x,
                         x, N, d, l, site)


cdef inline void llama_projection_forward(LayerActs* a, const ModelConfig* c, float* out,
                                          const float* res, const float* inp,
                                          const float* weight, int N, int K, const Dropout* d,
                                          int l, int site) noexcept nogil:
    # out[N, C] = res + inp[N, K] @ weight^T (+ the site's adapter): o_proj and down_proj
    cdef size_t i, size = <size_t>N * c.C
    if not lora_on(a.lora, site):
        residual_forward(a.bf16, out, res, inp, weight, NULL, N, K, c.C)
        return
    linear_forward(a.bf16, out, inp, weight, NULL, N, K, c.C)
    lora_forward(a.lora, c, out, c.C, site_h(a, site, N), a.lora_x, inp, N, d, l, site)
    for i in range(size):
        out[i] = res[i] + out[i]


cdef void llama_block_forward(LayerActs* a, const float* res, const LayerParams* p, int B,
                              int n, const ModelConfig* c, const Dropout* d,
                              int l) noexcept nogil:
    # block l on the residual stream res (N, C): a.residual3 = its output
    cdef int N = B * n, C = c.C, F = c.F, hs = head_size(c)
    rmsnorm_forward(a.ln, a.ln1_rstd, res, p.ln1w, N, C, c.norm_eps)
    linear_forward(a.bf16, a.qkv, a.ln, p.qkvw, p.qkvb, N, C, c.W)
    llama_adapters_forward(a, c, a.qkv, c.W, a.ln, N, d, l, LORA_Q, LORA_V)
    rope_rotate(a.qkv, a.rope_cos, a.rope_sin, B, n, c.W, c.NH + c.KVH, hs, False)
    attention_forward(bf16_products(a.bf16), a.atty, a.att_max, a.att_scale, a.att_probs, a.qkv, B, n, C,
                      c.NH, c.KVH, d, l)
    llama_projection_forward(a, c, a.residual2, res, a.atty, p.attprojw, N, C, d, l, LORA_O)
    rmsnorm_forward(a.ln, a.ln2_rstd, a.residual2, p.ln2w, N, C, c.norm_eps)
    linear_forward(a.bf16, a.fch, a.ln, p.fcw, NULL, N, C, c.FW)
    llama_adapters_forward(a, c, a.fch, c.FW, a.ln, N, d, l, LORA_GATE, LORA_UP)
    swiglu_forward(a.fch_gelu, a.fch, N, F)
    llama_projection_forward(a, c, a.residual3, a.residual2, a.fch_gelu, p.fcprojw, N, F, d, l,
                             LORA_DOWN)


cdef inline void llama_adapters_backward(const LayerActs* la, const ModelConfig* c,
                                         float* lora_grads, float* dx, const float* dy, int ldy,
                                         const float* x, int N, const Dropout* d, int l,
                                         int first, int last) noexcept nogil:
    # site_backward of sites first .. last whose outputs are columns of dy
    cdef int site
    for site in range(first, last + 1):
        site_backward(la, c, lora_grads, dx, dy + site_column(c, site), ldy, x, N, d, l, site)


cdef void llama_block_backward(Activations* a, const LayerActs* la, const float* res,
                               const LayerParams* p, LayerParams* g, float* lora_grads,
                               const ModelConfig* c, const Dropout* d, int l) noexcept nogil:
    # gradient of block l whose input was res: a.dresidual holds d(output) on entry and
    # d(res) on return; g += the gradients of the block's parameters (NULL fields: frozen or
    # absent), lora_grads += the adapters' (with adapters). d: the forward's dropout
    cdef int B = a.B, n = a.n, N = a.B * a.n, C = c.C, F = c.F, hs = head_size(c)
    cdef size_t NC = <size_t>N * C
    # residual3 = residual2 + down_proj(silu(gate_proj(u)) * up_proj(u)), u = rmsnorm_2(residual2)
    clear(a.dresidual_mid, NC)
    residual_backward(a.dresidual_mid, a.dresidual, NC)
    swiglu_forward(la.fch_gelu, la.fch, N, F)
    clear(a.dwide, <size_t>N * F)
    linear_backward(a.bf16, a.dwide, g.fcprojw, NULL, a.dresidual, la.fch_gelu, p.fcprojw,
                    N, F, C)
    site_backward(la, c, lora_grads, a.dwide, a.dresidual, C, la.fch_gelu, N, d, l, LORA_DOWN)
    clear(a.dfch, <size_t>N * c.FW)
    swiglu_backward(a.dfch, la.fch, a.dwide, N, F)
    rmsnorm_apply(la.ln, la.residual2, la.ln2_rstd, p.ln2w, N, C)
    clear(a.dnarrow, NC)
    linear_backward(a.bf16, a.dnarrow, g.fcw, NULL, a.dfch, la.ln, p.fcw, N, C, c.FW)
    llama_adapters_backward(la, c, lora_grads, a.dnarrow, a.dfch, c.FW, la.ln, N, d, l,
                            LORA_GATE, LORA_UP)
    rmsnorm_backward(a.dresidual_mid, g.ln2w, a.dnarrow, la.residual2, p.ln2w, la.ln2_rstd,
                     N, C)
    # residual2 = res + o_proj(attention(...)), the attention's inputs from rmsnorm_1(res)
    clear(a.dresidual, NC)
    residual_backward(a.dresidual, a.dresidual_mid, NC)
    clear(a.dnarrow, NC)
    linear_backward(a.bf16, a.dnarrow, g.attprojw, NULL, a.dresidual_mid, la.atty, p.attprojw,
                    N, C, C)
    site_backward(la, c, lora_grads, a.dnarrow, a.dresidual_mid, C, la.atty, N, d, l, LORA_O)
    clear(a.dwide, <size_t>N * c.W)
    attention_backward(bf16_products(a.bf16), a.dwide, la.att_probs, la.att_dprobs, a.dnarrow, la.qkv,
                       la.att_max, la.att_scale, B, n, C, c.NH, c.KVH, d, l)
    rope_rotate(a.dwide, la.rope_cos, la.rope_sin, B, n, c.W, c.NH + c.KVH, hs, True)
    rmsnorm_apply(la.ln, res, la.ln1_rstd, p.ln1w, N, C)
    clear(a.dnarrow, NC)
    linear_backward(a.bf16, a.dnarrow, g.qkvw, g.qkvb, a.dwide, la.ln, p.qkvw, N, C, c.W)
    llama_adapters_backward(la, c, lora_grads, a.dnarrow, a.dwide, c.W, la.ln, N, d, l,
                            LORA_Q, LORA_V)
    rmsnorm_backward(a.dresidual, g.ln1w, a.dnarrow, res, p.ln1w, la.ln1_rstd, N, C)
