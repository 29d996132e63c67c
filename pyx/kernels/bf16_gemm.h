/* bf16 matrix products for --precision bf16: inputs rounded to bf16 (nearest even), products
 * accumulated and written in fp32 by oneDNN's matmul.
 *
 * oneDNN is not linked: bf16_library_load() dlopens the libdnnl.so.3 of the onednn-cpu-gomp
 * wheel (the `bf16` extra) when a run asks for bf16, so fp32 builds and runs never need it.
 * The few C API entry points used are declared here with the types and enum values of
 * oneDNN 3.2's dnnl_types.h / dnnl_common_types.h.
 *
 * Determinism: every sphere owns its engine, stream, primitives and scratchpad (user
 * scratchpad mode, global primitive cache off), and runs each product on its own thread with
 * one OpenMP thread, so a product's bits depend only on its shape and inputs. */
#ifndef CLLM_BF16_GEMM_H
#define CLLM_BF16_GEMM_H

#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int cllm_dnnl_status;      /* dnnl_status_t: 0 is dnnl_success */
typedef void* cllm_dnnl_handle;    /* engine, stream, memory desc, memory, primitive, ... */
typedef int64_t cllm_dnnl_dims[12];
typedef struct { int arg; cllm_dnnl_handle memory; } cllm_dnnl_exec_arg;

enum {
    CLLM_DNNL_CPU = 1,              /* dnnl_cpu */
    CLLM_DNNL_BF16 = 2,             /* dnnl_bf16 */
    CLLM_DNNL_F32 = 3,              /* dnnl_f32 */
    CLLM_DNNL_DT_UNDEF = 0,         /* dnnl_data_type_undef: a sum post-op in dst's type */
    CLLM_DNNL_STREAM_IN_ORDER = 1,  /* dnnl_stream_default_flags */
    CLLM_DNNL_SCRATCHPAD_USER = 1,  /* dnnl_scratchpad_mode_user */
    CLLM_DNNL_QUERY_IMPL_INFO = 8,  /* dnnl_query_impl_info_str */
    CLLM_DNNL_QUERY_EXEC_ARG_MD = 255,
    CLLM_DNNL_ARG_SRC = 1,
    CLLM_DNNL_ARG_DST = 17,
    CLLM_DNNL_ARG_WEIGHTS = 33,
    CLLM_DNNL_ARG_SCRATCHPAD = 80,
};

typedef struct {
    void* library;
    cllm_dnnl_status (*engine_create)(cllm_dnnl_handle*, int, size_t);
    cllm_dnnl_status (*engine_destroy)(cllm_dnnl_handle);
    cllm_dnnl_status (*stream_create)(cllm_dnnl_handle*, cllm_dnnl_handle, unsigned);
    cllm_dnnl_status (*stream_destroy)(cllm_dnnl_handle);
    cllm_dnnl_status (*memory_desc_create_with_strides)(cllm_dnnl_handle*, int,
                                                         const int64_t*, int, const int64_t*);
    cllm_dnnl_status (*memory_desc_destroy)(cllm_dnnl_handle);
    size_t (*memory_desc_get_size)(cllm_dnnl_handle);
    cllm_dnnl_status (*memory_create)(cllm_dnnl_handle*, cllm_dnnl_handle, cllm_dnnl_handle, void*);
    cllm_dnnl_status (*memory_set_data_handle)(cllm_dnnl_handle, void*);
    cllm_dnnl_status (*memory_destroy)(cllm_dnnl_handle);
    cllm_dnnl_status (*attr_create)(cllm_dnnl_handle*);
    cllm_dnnl_status (*attr_destroy)(cllm_dnnl_handle);
    cllm_dnnl_status (*attr_set_scratchpad_mode)(cllm_dnnl_handle, int);
    cllm_dnnl_status (*attr_set_post_ops)(cllm_dnnl_handle, cllm_dnnl_handle);
    cllm_dnnl_status (*post_ops_create)(cllm_dnnl_handle*);
    cllm_dnnl_status (*post_ops_destroy)(cllm_dnnl_handle);
    cllm_dnnl_status (*post_ops_append_sum)(cllm_dnnl_handle, float, int32_t, int);
    cllm_dnnl_status (*matmul_desc_create)(cllm_dnnl_handle*, cllm_dnnl_handle, cllm_dnnl_handle,
                                           cllm_dnnl_handle, cllm_dnnl_handle, cllm_dnnl_handle,
                                           cllm_dnnl_handle);
    cllm_dnnl_status (*desc_query)(cllm_dnnl_handle, int, int, void*);
    cllm_dnnl_handle (*desc_query_md)(cllm_dnnl_handle, int, int);
    cllm_dnnl_status (*desc_destroy)(cllm_dnnl_handle);
    cllm_dnnl_status (*primitive_create)(cllm_dnnl_handle*, cllm_dnnl_handle);
    cllm_dnnl_status (*primitive_execute)(cllm_dnnl_handle, cllm_dnnl_handle, int,
                                          const cllm_dnnl_exec_arg*);
    cllm_dnnl_status (*primitive_destroy)(cllm_dnnl_handle);
    cllm_dnnl_status (*primitive_get_desc)(cllm_dnnl_handle, cllm_dnnl_handle*);
    cllm_dnnl_status (*stream_wait)(cllm_dnnl_handle);
    cllm_dnnl_status (*set_primitive_cache_capacity)(int);
    void (*omp_set_num_threads)(int);
    int (*omp_get_max_threads)(void);
} cllm_dnnl_api;

static cllm_dnnl_api cllm_dnnl;

/* Loads oneDNN from `path` once; 0 on success, else -1 with a reason in `err`. Call with the
 * GIL held, before any sphere runs a bf16 product. */
static int bf16_library_load(const char* path, char* err, size_t err_size) {
    cllm_dnnl_api api;
    void* gomp;
    if (cllm_dnnl.library != NULL)
        return 0;
    memset(&api, 0, sizeof(api));
    api.library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (api.library == NULL) {
        snprintf(err, err_size, "%s", dlerror());
        return -1;
    }
#define CLLM_BIND(field, name)                                                  \
    *(void**)(&api.field) = dlsym(api.library, name);                           \
    if (api.field == NULL) {                                                    \
        snprintf(err, err_size, "%s has no %s", path, name);                   \
        dlclose(api.library);                                                   \
        return -1;                                                              \
    }
    CLLM_BIND(engine_create, "dnnl_engine_create")
    CLLM_BIND(engine_destroy, "dnnl_engine_destroy")
    CLLM_BIND(stream_create, "dnnl_stream_create")
    CLLM_BIND(stream_destroy, "dnnl_stream_destroy")
    CLLM_BIND(memory_desc_create_with_strides, "dnnl_memory_desc_create_with_strides")
    CLLM_BIND(memory_desc_destroy, "dnnl_memory_desc_destroy")
    CLLM_BIND(memory_desc_get_size, "dnnl_memory_desc_get_size")
    CLLM_BIND(memory_create, "dnnl_memory_create")
    CLLM_BIND(memory_set_data_handle, "dnnl_memory_set_data_handle")
    CLLM_BIND(memory_destroy, "dnnl_memory_destroy")
    CLLM_BIND(attr_create, "dnnl_primitive_attr_create")
    CLLM_BIND(attr_destroy, "dnnl_primitive_attr_destroy")
    CLLM_BIND(attr_set_scratchpad_mode, "dnnl_primitive_attr_set_scratchpad_mode")
    CLLM_BIND(attr_set_post_ops, "dnnl_primitive_attr_set_post_ops")
    CLLM_BIND(post_ops_create, "dnnl_post_ops_create")
    CLLM_BIND(post_ops_destroy, "dnnl_post_ops_destroy")
    CLLM_BIND(post_ops_append_sum, "dnnl_post_ops_append_sum")
    CLLM_BIND(matmul_desc_create, "dnnl_matmul_primitive_desc_create")
    CLLM_BIND(desc_query, "dnnl_primitive_desc_query")
    CLLM_BIND(desc_query_md, "dnnl_primitive_desc_query_md")
    CLLM_BIND(desc_destroy, "dnnl_primitive_desc_destroy")
    CLLM_BIND(primitive_create, "dnnl_primitive_create")
    CLLM_BIND(primitive_execute, "dnnl_primitive_execute")
    CLLM_BIND(primitive_destroy, "dnnl_primitive_destroy")
    CLLM_BIND(primitive_get_desc, "dnnl_primitive_get_primitive_desc")
    CLLM_BIND(stream_wait, "dnnl_stream_wait")
    CLLM_BIND(set_primitive_cache_capacity, "dnnl_set_primitive_cache_capacity")
#undef CLLM_BIND
    /* the wheel's library runs on the system's libgomp, loaded with it */
    gomp = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (gomp != NULL) {
        *(void**)(&api.omp_set_num_threads) = dlsym(gomp, "omp_set_num_threads");
        *(void**)(&api.omp_get_max_threads) = dlsym(gomp, "omp_get_max_threads");
    }
    if (api.omp_set_num_threads == NULL || api.omp_get_max_threads == NULL) {
        snprintf(err, err_size, "%s is not the OpenMP (libgomp) build of oneDNN", path);
        dlclose(api.library);
        return -1;
    }
    /* no primitive shared between spheres: each builds and keeps its own */
    api.set_primitive_cache_capacity(0);
    cllm_dnnl = api;
    return 0;
}

static inline int bf16_library_loaded(void) { return cllm_dnnl.library != NULL; }

/* fp32 -> bf16, round to nearest even; a NaN stays a (quiet) NaN. Both results are computed
   and one is selected, without a branch, so that loops over it vectorise. */
static inline uint16_t bf16_round(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof(u));
    uint32_t quiet = (u >> 16) | 0x0040u;
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, sizeof(x));
    return x;
}

/* dst[i, j] = bf16(src[i * ld + j]) for a rows x cols block; dst is dense (leading dim cols) */
__attribute__((noinline))   /* a function of its own in profiles (benchmarks.profile_ops) */
static void bf16_round_rows(uint16_t* dst, const float* src, size_t rows, size_t cols, size_t ld) {
    size_t i, j;
    for (i = 0; i < rows; i++) {
        const float* s = src + i * ld;
        uint16_t* d = dst + i * cols;
        for (j = 0; j < cols; j++)
            d[j] = bf16_round(s[j]);
    }
}

/* one product shape (and input type: bf16, or f32 for the fp32 kernel) with its primitive and
 * the memory objects it runs on */
typedef struct {
    int type, trans_a, trans_b, M, N, K, lda, ldb, ldc, accumulate;
    cllm_dnnl_handle primitive, a, b, c, scratchpad;
    size_t scratchpad_bytes;
} bf16_plan;

/* a sphere's own oneDNN state */
typedef struct {
    cllm_dnnl_handle engine, stream;
    bf16_plan* plans;
    int num_plans, plan_capacity;
    void* scratchpad;
    size_t scratchpad_bytes;
    int status;        /* 0, or the first failure's oneDNN status (or -1: out of memory) */
} bf16_context;

static int bf16_context_init(bf16_context* g) {
    memset(g, 0, sizeof(*g));
    if (cllm_dnnl.engine_create(&g->engine, CLLM_DNNL_CPU, 0) != 0)
        return -1;
    if (cllm_dnnl.stream_create(&g->stream, g->engine, CLLM_DNNL_STREAM_IN_ORDER) != 0) {
        cllm_dnnl.engine_destroy(g->engine);
        return -1;
    }
    return 0;
}

static void bf16_context_free(bf16_context* g) {
    int i;
    for (i = 0; i < g->num_plans; i++) {
        bf16_plan* p = &g->plans[i];
        cllm_dnnl.primitive_destroy(p->primitive);
        cllm_dnnl.memory_destroy(p->a);
        cllm_dnnl.memory_destroy(p->b);
        cllm_dnnl.memory_destroy(p->c);
        if (p->scratchpad != NULL)
            cllm_dnnl.memory_destroy(p->scratchpad);
    }
    free(g->plans);
    free(g->scratchpad);
    if (g->stream != NULL)
        cllm_dnnl.stream_destroy(g->stream);
    if (g->engine != NULL)
        cllm_dnnl.engine_destroy(g->engine);
    memset(g, 0, sizeof(*g));
}

static cllm_dnnl_status bf16_matrix_desc(cllm_dnnl_handle* md, int rows, int cols, int ld,
                                         int transposed, int type) {
    /* row-major rows x cols; transposed: the matrix is stored as cols x rows (leading dim ld) */
    cllm_dnnl_dims dims = {rows, cols}, strides = {ld, 1};
    if (transposed) {
        strides[0] = 1;
        strides[1] = ld;
    }
    return cllm_dnnl.memory_desc_create_with_strides(md, 2, dims, type, strides);
}

/* builds the plan for one shape; 0 on success, else a oneDNN status (-1: out of memory) */
static cllm_dnnl_status bf16_plan_create(bf16_context* g, bf16_plan* p) {
    cllm_dnnl_handle a_md = NULL, b_md = NULL, c_md = NULL, attr = NULL, ops = NULL, desc = NULL;
    cllm_dnnl_handle s_md;
    cllm_dnnl_status st;
    st = bf16_matrix_desc(&a_md, p->M, p->K, p->lda, p->trans_a, p->type);
    if (st == 0) st = bf16_matrix_desc(&b_md, p->K, p->N, p->ldb, p->trans_b, p->type);
    if (st == 0) st = bf16_matrix_desc(&c_md, p->M, p->N, p->ldc, 0, CLLM_DNNL_F32);
    if (st == 0) st = cllm_dnnl.attr_create(&attr);
    if (st == 0) st = cllm_dnnl.attr_set_scratchpad_mode(attr, CLLM_DNNL_SCRATCHPAD_USER);
    if (st == 0 && p->accumulate) {
        st = cllm_dnnl.post_ops_create(&ops);
        if (st == 0) st = cllm_dnnl.post_ops_append_sum(ops, 1.0f, 0, CLLM_DNNL_DT_UNDEF);
        if (st == 0) st = cllm_dnnl.attr_set_post_ops(attr, ops);
    }
    if (st == 0) st = cllm_dnnl.matmul_desc_create(&desc, g->engine, a_md, b_md, NULL, c_md, attr);
    if (st == 0) st = cllm_dnnl.primitive_create(&p->primitive, desc);
    if (st == 0) st = cllm_dnnl.memory_create(&p->a, a_md, g->engine, NULL);
    if (st == 0) st = cllm_dnnl.memory_create(&p->b, b_md, g->engine, NULL);
    if (st == 0) st = cllm_dnnl.memory_create(&p->c, c_md, g->engine, NULL);
    if (st == 0) {
        s_md = cllm_dnnl.desc_query_md(desc, CLLM_DNNL_QUERY_EXEC_ARG_MD, CLLM_DNNL_ARG_SCRATCHPAD);
        p->scratchpad_bytes = s_md != NULL ? cllm_dnnl.memory_desc_get_size(s_md) : 0;
        if (p->scratchpad_bytes > 0)
            st = cllm_dnnl.memory_create(&p->scratchpad, s_md, g->engine, NULL);
    }
    if (desc != NULL) cllm_dnnl.desc_destroy(desc);
    if (ops != NULL) cllm_dnnl.post_ops_destroy(ops);
    if (attr != NULL) cllm_dnnl.attr_destroy(attr);
    if (a_md != NULL) cllm_dnnl.memory_desc_destroy(a_md);
    if (b_md != NULL) cllm_dnnl.memory_desc_destroy(b_md);
    if (c_md != NULL) cllm_dnnl.memory_desc_destroy(c_md);
    return st;
}

static bf16_plan* bf16_plan_for(bf16_context* g, int type, int trans_a, int trans_b, int M,
                                int N, int K, int lda, int ldb, int ldc, int accumulate) {
    int i;
    bf16_plan* p;
    cllm_dnnl_status st;
    for (i = 0; i < g->num_plans; i++) {
        p = &g->plans[i];
        if (p->type == type && p->trans_a == trans_a && p->trans_b == trans_b && p->M == M
                && p->N == N
                && p->K == K && p->lda == lda && p->ldb == ldb && p->ldc == ldc
                && p->accumulate == accumulate)
            return p;
    }
    if (g->num_plans == g->plan_capacity) {
        int capacity = g->plan_capacity ? 2 * g->plan_capacity : 16;
        bf16_plan* grown = (bf16_plan*)realloc(g->plans, capacity * sizeof(bf16_plan));
        if (grown == NULL) {
            g->status = -1;
            return NULL;
        }
        g->plans = grown;
        g->plan_capacity = capacity;
    }
    p = &g->plans[g->num_plans];
    memset(p, 0, sizeof(*p));
    p->type = type; p->trans_a = trans_a; p->trans_b = trans_b; p->M = M; p->N = N; p->K = K;
    p->lda = lda; p->ldb = ldb; p->ldc = ldc; p->accumulate = accumulate;
    st = bf16_plan_create(g, p);
    if (st == 0 && p->scratchpad_bytes > g->scratchpad_bytes) {
        void* grown = realloc(g->scratchpad, p->scratchpad_bytes);
        if (grown == NULL) {
            st = -1;
        } else {
            g->scratchpad = grown;
            g->scratchpad_bytes = p->scratchpad_bytes;
        }
    }
    if (st != 0) {
        if (p->primitive != NULL) cllm_dnnl.primitive_destroy(p->primitive);
        if (p->a != NULL) cllm_dnnl.memory_destroy(p->a);
        if (p->b != NULL) cllm_dnnl.memory_destroy(p->b);
        if (p->c != NULL) cllm_dnnl.memory_destroy(p->c);
        if (p->scratchpad != NULL) cllm_dnnl.memory_destroy(p->scratchpad);
        g->status = st;
        return NULL;
    }
    g->num_plans++;
    return p;
}

/* C[M,N] = op(A)[M,K] @ op(B)[K,N] (+ C when accumulate), all row-major as in sgemm_rm:
 * A and B of `type` (bf16 or f32), C fp32. On failure C is set to NaN and g->status keeps
 * the reason. */
static void dnnl_gemm(bf16_context* g, int type, int trans_a, int trans_b, int M, int N, int K,
                      const void* A, int lda, const void* B, int ldb, int accumulate,
                      float* C, int ldc) {
    bf16_plan* p;
    cllm_dnnl_exec_arg args[4];
    int nargs = 3, i, j;
    cllm_dnnl_status st;
    if (cllm_dnnl.omp_get_max_threads() != 1)
        cllm_dnnl.omp_set_num_threads(1);   /* per calling thread: one library thread per sphere */
    p = g->status == 0 ? bf16_plan_for(g, type, trans_a, trans_b, M, N, K, lda, ldb, ldc,
                                       accumulate)
                       : NULL;
    if (p != NULL) {
        cllm_dnnl.memory_set_data_handle(p->a, (void*)A);
        cllm_dnnl.memory_set_data_handle(p->b, (void*)B);
        cllm_dnnl.memory_set_data_handle(p->c, C);
        args[0].arg = CLLM_DNNL_ARG_SRC; args[0].memory = p->a;
        args[1].arg = CLLM_DNNL_ARG_WEIGHTS; args[1].memory = p->b;
        args[2].arg = CLLM_DNNL_ARG_DST; args[2].memory = p->c;
        if (p->scratchpad != NULL) {
            cllm_dnnl.memory_set_data_handle(p->scratchpad, g->scratchpad);
            args[3].arg = CLLM_DNNL_ARG_SCRATCHPAD; args[3].memory = p->scratchpad;
            nargs = 4;
        }
        st = cllm_dnnl.primitive_execute(p->primitive, g->stream, nargs, args);
        if (st == 0)
            st = cllm_dnnl.stream_wait(g->stream);
        if (st == 0)
            return;
        g->status = st;
    }
    for (i = 0; i < M; i++)
        for (j = 0; j < N; j++)
            C[(size_t)i * ldc + j] = NAN;
}

/* dnnl_gemm on bf16 inputs (--precision bf16) */
static void bf16_gemm(bf16_context* g, int trans_a, int trans_b, int M, int N, int K,
                      const uint16_t* A, int lda, const uint16_t* B, int ldb, int accumulate,
                      float* C, int ldc) {
    dnnl_gemm(g, CLLM_DNNL_BF16, trans_a, trans_b, M, N, K, A, lda, B, ldb, accumulate, C, ldc);
}

/* dnnl_gemm on fp32 inputs: oneDNN's fp32 matmul (--matmul onednn) */
static void f32_gemm(bf16_context* g, int trans_a, int trans_b, int M, int N, int K,
                     const float* A, int lda, const float* B, int ldb, int accumulate,
                     float* C, int ldc) {
    dnnl_gemm(g, CLLM_DNNL_F32, trans_a, trans_b, M, N, K, A, lda, B, ldb, accumulate, C, ldc);
}

/* the name of the implementation oneDNN picked for plan `index`, or NULL */
static const char* bf16_plan_impl(bf16_context* g, int index) {
    const char* name = NULL;
    cllm_dnnl_handle desc = NULL;
    if (index < 0 || index >= g->num_plans
            || cllm_dnnl.primitive_get_desc(g->plans[index].primitive, &desc) != 0
            || cllm_dnnl.desc_query(desc, CLLM_DNNL_QUERY_IMPL_INFO, 0, &name) != 0)
        return NULL;
    return name;
}

#endif
