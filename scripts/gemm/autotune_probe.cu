// How much faster is the best of cuBLASLt's top-16 heuristic algorithms than the top-1 it returns, on the GEMMs of
// our QLoRA training step? bf16 in and out, f32 compute and scale, 32 MiB workspace, 256-byte alignment: the
// settings of kernels/src/cuda/matmul.rs, with its row-major → column-major mapping (see `Gemm` below).
//
// Per shape: cublasLtMatmulAlgoGetHeuristic(requestedAlgoCount = 16), then every returned algorithm is timed
// (CUDA events, 5 warm-up runs, median of 20; by default the L2 is flushed before each timed run so every algorithm
// starts cold); when another algorithm beats top-1, the two are timed again and those numbers are printed. One line
// per shape, then per-model sums of the top-1 and best times.
//
// Usage: autotune_probe [--no-flush] [SUBSTRING]   (SUBSTRING keeps only the shapes whose label contains it)
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#define CUDA(x)                                                                                              \
  do {                                                                                                       \
    cudaError_t e_ = (x);                                                                                    \
    if (e_ != cudaSuccess) {                                                                                 \
      fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));             \
      exit(1);                                                                                               \
    }                                                                                                        \
  } while (0)
#define LT(x)                                                                                                \
  do {                                                                                                       \
    cublasStatus_t s_ = (x);                                                                                 \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                                                       \
      fprintf(stderr, "%s:%d: %s failed: %s (%d)\n", __FILE__, __LINE__, #x, cublasLtGetStatusString(s_),    \
              (int)s_);                                                                                      \
      exit(1);                                                                                               \
    }                                                                                                        \
  } while (0)

static const int kRequested = 16, kWarmup = 5, kRuns = 20;
static const size_t kWorkspace = 32u << 20;  // NVIDIA's recommendation for Hopper, what matmul.rs uses there
static const uint32_t kAlign = 256;          // cudaMalloc pointers, and every ld below is a multiple of 128 elements

// Row-major C[m,n] = A[m,k] · op(B): forward B = W[out,in] used transposed (n = out, k = in); dX = dY·W with
// B = W[out,in] as is (n = in, k = out). A = activations [m,k], never transposed.
struct Gemm {
  const char *group, *name;
  bool dx;
  int64_t m, n, k;
  int per_step;  // times this GEMM runs in one 8192-token step: layers × projections of this shape (1 for lm_head)
};

// Random-ish bf16 in [-0.5, 0.5): zeros would let the tensor cores draw less power and flatter every algorithm.
__global__ void fill(__nv_bfloat16 *p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
    p[i] = __float2bfloat16((h & 0xffff) / 65536.0f - 0.5f);
  }
}

static void describe(const cublasLtMatmulAlgo_t &a, char *out, size_t len) {
  int32_t id = 0, splitk = 0;
  uint32_t tile = 0, stages = 0;
  uint16_t cluster = 0;
  size_t w;
  LT(cublasLtMatmulAlgoConfigGetAttribute(&a, CUBLASLT_ALGO_CONFIG_ID, &id, sizeof id, &w));
  LT(cublasLtMatmulAlgoConfigGetAttribute(&a, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof tile, &w));
  LT(cublasLtMatmulAlgoConfigGetAttribute(&a, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof stages, &w));
  LT(cublasLtMatmulAlgoConfigGetAttribute(&a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof splitk, &w));
  LT(cublasLtMatmulAlgoConfigGetAttribute(&a, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cluster, sizeof cluster, &w));
  snprintf(out, len, "id%d/t%u/s%u/k%d/c%u", id, tile, stages, splitk, (unsigned)cluster);
}

int main(int argc, char **argv) {
  bool flush = true;
  const char *filter = nullptr;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--no-flush")) flush = false;
    else filter = argv[i];
  }

  // (group, projection, in, out, tokens m, times per step); each in the forward and the dX form (QLoRA computes no
  // dW for the frozen base weights). Layers: Llama-3.2-1B 16, Llama-3-8B 32, Gemma-2-2B 26 (its LM head not listed).
  struct Proj { const char *group, *name; int64_t in, out, m; int per_step; };
  const Proj projs[] = {
      {"llama-1B", "q/o", 2048, 2048, 8192, 2 * 16},      {"llama-1B", "k/v", 2048, 512, 8192, 2 * 16},
      {"llama-1B", "gate/up", 2048, 8192, 8192, 2 * 16},  {"llama-1B", "down", 8192, 2048, 8192, 16},
      {"llama-1B", "lm_head", 2048, 128256, 8192, 1},
      {"llama-8B", "q/o", 4096, 4096, 8192, 2 * 32},      {"llama-8B", "k/v", 4096, 1024, 8192, 2 * 32},
      {"llama-8B", "gate/up", 4096, 14336, 8192, 2 * 32}, {"llama-8B", "down", 14336, 4096, 8192, 32},
      {"llama-8B", "lm_head", 4096, 128256, 8192, 1},
      // The LM head in 4096-token chunks (2 per step): its own group, to compare with llama-8B's m = 8192 LM head.
      {"llama-8B-lm4096", "lm_head", 4096, 128256, 4096, 2},
      {"gemma2-2B", "q", 2304, 2048, 8192, 26},           {"gemma2-2B", "o", 2048, 2304, 8192, 26},
      {"gemma2-2B", "k/v", 2304, 1024, 8192, 2 * 26},     {"gemma2-2B", "gate/up", 2304, 9216, 8192, 2 * 26},
      {"gemma2-2B", "down", 9216, 2304, 8192, 26},
  };
  std::vector<Gemm> gemms;
  for (const Proj &p : projs) {
    gemms.push_back({p.group, p.name, false, p.m, p.out, p.in, p.per_step});
    gemms.push_back({p.group, p.name, true, p.m, p.in, p.out, p.per_step});
  }
  gemms.push_back({"reference", "8192^3", false, 8192, 8192, 8192, 1});
  if (filter) {
    std::vector<Gemm> kept;
    for (const Gemm &g : gemms) {
      std::string label = std::string(g.group) + " " + g.name + (g.dx ? " dX" : " fwd");
      if (label.find(filter) != std::string::npos) kept.push_back(g);
    }
    gemms.swap(kept);
  }

  // One buffer per operand, sized for the largest use (the LM head's ~2.1 GB logits / dlogits), shared by all shapes.
  size_t max_a = 0, max_b = 0, max_c = 0;
  for (const Gemm &g : gemms) {
    max_a = std::max(max_a, (size_t)(g.m * g.k));
    max_b = std::max(max_b, (size_t)(g.k * g.n));
    max_c = std::max(max_c, (size_t)(g.m * g.n));
  }
  cudaDeviceProp prop;
  CUDA(cudaGetDeviceProperties(&prop, 0));
  printf("device: %s (sm_%d%d, L2 %d MiB), cublasLt %zu, flush L2 %s, %d requested algos, median of %d after %d\n",
         prop.name, prop.major, prop.minor, prop.l2CacheSize >> 20, cublasLtGetVersion(), flush ? "yes" : "no",
         kRequested, kRuns, kWarmup);
  __nv_bfloat16 *A, *B, *C;
  void *workspace, *scrub;
  const size_t scrub_bytes = 4 * (size_t)prop.l2CacheSize;  // written before each timed run to evict A, B and C
  CUDA(cudaMalloc(&A, max_a * 2));
  CUDA(cudaMalloc(&B, max_b * 2));
  CUDA(cudaMalloc(&C, max_c * 2));
  CUDA(cudaMalloc(&workspace, kWorkspace));
  CUDA(cudaMalloc(&scrub, scrub_bytes));
  fill<<<1024, 256>>>(A, max_a, 1);
  fill<<<1024, 256>>>(B, max_b, 2);
  CUDA(cudaGetLastError());
  CUDA(cudaDeviceSynchronize());

  cublasLtHandle_t lt;
  LT(cublasLtCreate(&lt));
  cudaStream_t stream;
  CUDA(cudaStreamCreate(&stream));
  cudaEvent_t start, stop;
  CUDA(cudaEventCreate(&start));
  CUDA(cudaEventCreate(&stop));
  const float alpha = 1.0f, beta = 0.0f;

  struct Total { std::string group; double top1 = 0, best = 0, step_top1 = 0, step_best = 0; };
  std::vector<Total> totals;
  for (const Gemm &g : gemms) {
    // cuBLASLt is column-major and row-major [r,c] is column-major [c,r], so C = A·op(B) runs as
    // Cᵀ[n,m] = op(B)ᵀ·Aᵀ: cuBLASLt's A is our B, its B our A (matmul.rs does the same).
    cublasLtMatmulDesc_t desc;
    LT(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const int32_t op_a = g.dx ? CUBLAS_OP_N : CUBLAS_OP_T, op_b = CUBLAS_OP_N;
    LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof op_a));
    LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof op_b));
    cublasLtMatrixLayout_t la, lb, lc;
    // Forward: W[n,k] row-major = column-major [k,n] (ld k), transposed. dX: W[k,n] row-major = column-major [n,k].
    if (g.dx) LT(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, g.n, g.k, g.n));
    else LT(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, g.k, g.n, g.k));
    LT(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, g.k, g.m, g.k));  // A[m,k] row-major
    LT(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, g.n, g.m, g.n));  // C[m,n] row-major, D = C
    cublasLtMatmulPreference_t pref;
    LT(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t ws = kWorkspace;
    LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
      LT(cublasLtMatmulPreferenceSetAttribute(pref, attr, &kAlign, sizeof kAlign));
    cublasLtMatmulHeuristicResult_t heur[kRequested];
    int returned = 0;
    // NOT_SUPPORTED means no algorithm fits: reported on the shape's line below, not fatal.
    cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, lc, pref, kRequested, heur, &returned);
    if (hs == CUBLAS_STATUS_NOT_SUPPORTED) returned = 0;
    else LT(hs);

    auto run = [&](int i) {
      return cublasLtMatmul(lt, desc, &alpha, B, la, A, lb, &beta, C, lc, C, lc, &heur[i].algo, workspace,
                            kWorkspace, stream);
    };
    // Median ms of one algorithm, or -1 when it cannot run (reported, then skipped).
    auto time_algo = [&](int i) -> double {
      if (heur[i].state != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "  algo %d: heuristic state %s, skipped\n", i, cublasLtGetStatusString(heur[i].state));
        return -1;
      }
      cublasStatus_t s = CUBLAS_STATUS_SUCCESS;
      for (int w = 0; w < kWarmup && s == CUBLAS_STATUS_SUCCESS; w++) s = run(i);
      if (s != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "  algo %d: cublasLtMatmul failed: %s, skipped\n", i, cublasLtGetStatusString(s));
        return -1;
      }
      std::vector<float> t(kRuns);
      for (int r = 0; r < kRuns; r++) {
        if (flush) CUDA(cudaMemsetAsync(scrub, r, scrub_bytes, stream));  // outside the events: not timed
        CUDA(cudaEventRecord(start, stream));
        LT(run(i));
        CUDA(cudaEventRecord(stop, stream));
        CUDA(cudaEventSynchronize(stop));
        CUDA(cudaEventElapsedTime(&t[r], start, stop));
      }
      std::sort(t.begin(), t.end());
      return 0.5 * (t[kRuns / 2 - 1] + t[kRuns / 2]);
    };
    std::vector<double> ms(returned, -1.0);
    for (int i = 0; i < returned; i++) ms[i] = time_algo(i);
    int best = -1;
    for (int i = 0; i < returned; i++)
      if (ms[i] > 0 && (best < 0 || ms[i] < ms[best])) best = i;
    // The minimum of 16 noisy medians is biased low: when a non-top-1 algorithm wins the sweep, time top-1 and it
    // again, back to back, and report those two numbers instead.
    if (best > 0 && ms[0] > 0) {
      const double again0 = time_algo(0), againb = time_algo(best);
      if (again0 > 0 && againb > 0) ms[0] = again0, ms[best] = againb;
    }
    CUDA(cudaGetLastError());

    char label[64];
    snprintf(label, sizeof label, "%s %s %s", g.group, g.name, g.dx ? "dX" : "fwd");
    if (returned == 0 || ms[0] <= 0 || best < 0) {
      printf("%-26s m=%6ld n=%6ld k=%6ld  %d algos, top-1 did not run: no comparison\n", label, (long)g.m,
             (long)g.n, (long)g.k, returned);
    } else {
      const double flop = 2.0 * g.m * g.n * g.k;
      char d1[48], db[48];
      describe(heur[0].algo, d1, sizeof d1);
      describe(heur[best].algo, db, sizeof db);
      printf("%-26s m=%6ld n=%6ld k=%6ld  %2d algos | top-1 %8.3f ms %6.1f TFLOP/s %-22s | best #%-2d %8.3f ms "
             "%6.1f TFLOP/s %-22s | best/top-1 %.3fx\n",
             label, (long)g.m, (long)g.n, (long)g.k, returned, ms[0], flop / ms[0] / 1e9, d1, best, ms[best],
             flop / ms[best] / 1e9, db, ms[0] / ms[best]);
      if (totals.empty() || totals.back().group != g.group) totals.push_back({g.group});
      totals.back().top1 += ms[0];
      totals.back().best += ms[best];
      totals.back().step_top1 += g.per_step * ms[0];
      totals.back().step_best += g.per_step * ms[best];
    }
    fflush(stdout);
    LT(cublasLtMatmulPreferenceDestroy(pref));
    LT(cublasLtMatrixLayoutDestroy(la));
    LT(cublasLtMatrixLayoutDestroy(lb));
    LT(cublasLtMatrixLayoutDestroy(lc));
    LT(cublasLtMatmulDescDestroy(desc));
  }

  // "listed": each line above once. "per step": weighted by per_step, i.e. every layer's projections forward + dX
  // and the LM head once (the shapes that were run; with a SUBSTRING filter, only those).
  printf("\ntotals, ms:     %-24s | %s\n", "listed GEMMs once", "per 8192-token step (layers x projections)");
  for (const Total &t : totals)
    printf("  %-16s top-1 %8.3f best %8.3f (%.3fx) | top-1 %9.2f best %9.2f saved %6.2f ms = %4.1f%%\n",
           t.group.c_str(), t.top1, t.best, t.top1 / t.best, t.step_top1, t.step_best, t.step_top1 - t.step_best,
           100.0 * (t.step_top1 - t.step_best) / t.step_top1);
  LT(cublasLtDestroy(lt));
  return 0;
}
