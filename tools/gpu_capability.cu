// SPDX-License-Identifier: Apache-2.0
// gpu_capability: what the CUDA backend needs from this GPU, its driver, cuBLAS and CUB,
// printed as JSON lines (one object per line, "kind" first) for scripts/gpu-check.
//
// - the device, driver, runtime, cuBLAS and CUB versions;
// - every cuBLAS type combination the backend uses (experts.cuh, expert_gemm.cuh, router.cuh):
//   cublasGemmStridedBatchedEx (padded_capacity, dense), cublasGemmEx (16-bit sorted_grouped,
//   one per expert; the router) and cublasGemmGroupedBatchedEx (float sorted_grouped; 16-bit
//   probed but not required: cuBLAS's grouped table gives 16-bit A/B a C of the input type only)
//   with A/B = CUDA_R_32F / CUDA_R_16F / CUDA_R_16BF, C = CUDA_R_32F,
//   CUBLAS_COMPUTE_32F, for op(A)/op(B) = T/N, N/N and N/T, with beta = 0 (C poisoned with NaN:
//   it must not be read) and beta = 1 (accumulation), padded leading dimensions (the padding
//   holds NaN: it must not be read either). Inputs are multiples of 1/4 in [-2, 2], so every
//   product and sum is exact in float: the result must equal the host's bit for bit;
// - cub::DeviceRadixSort::SortPairs temporary storage for int32 keys / int64 values at a few
//   sizes and key widths (what the permutation takes from the workspace);
// - whether a tiny strided-batched and a tiny grouped GEMM can be captured in a CUDA graph
//   and replay to the eager result.
//
// Exit status: 0 when every required check passed, 1 otherwise, 77 without a GPU (the
// tests' convention). The grouped GEMM's capture is informational (not required: the
// sorted_grouped path synchronises anyway).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/version.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

int failures = 0;

//! A JSON string literal of `s`.
std::string quote(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

//! One JSON line: {"kind": kind, fields...}; `fields` is already "key": value, ...
void emit(const char* kind, const std::string& fields) {
  std::printf("{\"kind\": %s%s%s}\n", quote(kind).c_str(), fields.empty() ? "" : ", ", fields.c_str());
  std::fflush(stdout);
}

std::string kv(const char* key, const std::string& json_value) { return quote(key) + ": " + json_value; }
std::string kv(const char* key, long long v) { return kv(key, std::to_string(v)); }
std::string kvs(const char* key, const std::string& s) { return kv(key, quote(s)); }
std::string kvb(const char* key, bool b) { return kv(key, std::string(b ? "true" : "false")); }

//! A failed CUDA/cuBLAS call: the error text (empty on success).
std::string err(cudaError_t s) {
  return s == cudaSuccess ? "" : std::string(cudaGetErrorName(s)) + ": " + cudaGetErrorString(s);
}
std::string err(cublasStatus_t s) {
  return s == CUBLAS_STATUS_SUCCESS ? "" : std::string(cublasGetStatusName(s)) + ": " + cublasGetStatusString(s);
}

//! Aborts the whole probe on a failed setup call (allocation, copy): nothing else is
//! meaningful after it.
template <class S>
void must(S status, const char* what) {
  const std::string e = err(status);
  if (e.empty()) return;
  emit("fatal", kvs("call", what) + ", " + kvs("error", e));
  std::exit(1);
}

const char* type_name(cudaDataType_t t) {
  return t == CUDA_R_32F ? "CUDA_R_32F" : t == CUDA_R_16F ? "CUDA_R_16F" : "CUDA_R_16BF";
}
std::size_t type_size(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }

//! `v` stored as type `t` (exact for the probe's values) into `out` (bytes).
void store(cudaDataType_t t, float v, unsigned char* out) {
  if (t == CUDA_R_32F) {
    std::memcpy(out, &v, 4);
  } else if (t == CUDA_R_16F) {
    const __half h = __float2half_rn(v);
    std::memcpy(out, &h, 2);
  } else {
    const __nv_bfloat16 h = __float2bfloat16_rn(v);
    std::memcpy(out, &h, 2);
  }
}

//! A device buffer freed at scope exit.
struct dev_buf {
  void* p = nullptr;
  explicit dev_buf(std::size_t bytes) { must(cudaMalloc(&p, bytes == 0 ? 1 : bytes), "cudaMalloc"); }
  ~dev_buf() { (void)cudaFree(p); }
  dev_buf(const dev_buf&) = delete;
  dev_buf& operator=(const dev_buf&) = delete;
};

//! One column-major GEMM problem C[m×n] (+)= op(A) op(B) with padded leading dimensions.
struct problem {
  int m, n, k;
  cublasOperation_t ta, tb;
  int lda, ldb, ldc;
  int a_rows, a_cols, b_rows, b_cols;  // stored shapes (column-major)
  std::vector<float> a, b, c0;         // stored values; NaN in the padding

  problem(std::mt19937& g, int m_, int n_, int k_, cublasOperation_t ta_, cublasOperation_t tb_)
      : m(m_), n(n_), k(k_), ta(ta_), tb(tb_) {
    a_rows = ta == CUBLAS_OP_N ? m : k;
    a_cols = ta == CUBLAS_OP_N ? k : m;
    b_rows = tb == CUBLAS_OP_N ? k : n;
    b_cols = tb == CUBLAS_OP_N ? n : k;
    lda = a_rows + 1;
    ldb = b_rows + 2;
    ldc = m + 1;
    std::uniform_int_distribution<int> q(-8, 8);
    auto fill = [&](std::vector<float>& v, int rows, int cols, int ld) {
      v.assign(static_cast<std::size_t>(ld) * cols, NAN);
      for (int c = 0; c < cols; ++c)
        for (int r = 0; r < rows; ++r) {
          int x = q(g);
          if (x == 0) x = 3;  // never zeros
          v[static_cast<std::size_t>(c) * ld + r] = static_cast<float>(x) / 4.0f;
        }
    };
    fill(a, a_rows, a_cols, lda);
    fill(b, b_rows, b_cols, ldb);
    fill(c0, m, n, ldc);
  }
  float at_a(int i, int l) const {  // op(A)[i, l]
    return ta == CUBLAS_OP_N ? a[static_cast<std::size_t>(l) * lda + i] : a[static_cast<std::size_t>(i) * lda + l];
  }
  float at_b(int l, int j) const {  // op(B)[l, j]
    return tb == CUBLAS_OP_N ? b[static_cast<std::size_t>(j) * ldb + l] : b[static_cast<std::size_t>(l) * ldb + j];
  }
  //! The exact result (beta = 0 or 1) on the host.
  std::vector<float> reference(float beta) const {
    std::vector<float> c(static_cast<std::size_t>(ldc) * n, 0.0f);
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < m; ++i) {
        double s = 0.0;
        for (int l = 0; l < k; ++l) s += static_cast<double>(at_a(i, l)) * at_b(l, j);
        if (beta != 0.0f) s += c0[static_cast<std::size_t>(j) * ldc + i];
        c[static_cast<std::size_t>(j) * ldc + i] = static_cast<float>(s);
      }
    return c;
  }
  //! Stored bytes of A and B in type t.
  std::vector<unsigned char> bytes(const std::vector<float>& v, cudaDataType_t t) const {
    std::vector<unsigned char> out(v.size() * type_size(t));
    for (std::size_t i = 0; i < v.size(); ++i) store(t, v[i], out.data() + i * type_size(t));
    return out;
  }
  //! Index of the first element of C (m×n inside ldc) that differs from `want`, or -1.
  long long mismatch(const std::vector<float>& got, const std::vector<float>& want) const {
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < m; ++i) {
        const std::size_t x = static_cast<std::size_t>(j) * ldc + i;
        if (!(got[x] == want[x])) return static_cast<long long>(x);
      }
    return -1;
  }
};

const char* op_name(cublasOperation_t o) { return o == CUBLAS_OP_N ? "N" : "T"; }

//! Device copies of a list of problems' A, B, C (C set to c0, or NaN for beta = 0).
struct uploaded {
  std::vector<dev_buf*> bufs;
  std::vector<void*> a, b, c;
  uploaded(const std::vector<problem>& ps, cudaDataType_t t, float beta) {
    for (const auto& p : ps) {
      const auto ab = p.bytes(p.a, t), bb = p.bytes(p.b, t);
      std::vector<float> c_init = p.c0;
      if (beta == 0.0f) std::fill(c_init.begin(), c_init.end(), NAN);
      a.push_back(put(ab.data(), ab.size()));
      b.push_back(put(bb.data(), bb.size()));
      c.push_back(put(c_init.data(), c_init.size() * sizeof(float)));
    }
  }
  void* put(const void* host, std::size_t bytes) {
    bufs.push_back(new dev_buf(bytes));
    must(cudaMemcpy(bufs.back()->p, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
    return bufs.back()->p;
  }
  std::vector<float> get_c(std::size_t i, const problem& p) const {
    std::vector<float> out(static_cast<std::size_t>(p.ldc) * p.n);
    must(cudaMemcpy(out.data(), c[i], out.size() * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy");
    return out;
  }
  ~uploaded() {
    for (auto* b : bufs) delete b;
  }
};

//! Strided batched GEMM of `batch` problems of one shape laid out at fixed strides.
bool strided_case(cublasHandle_t h, cudaStream_t s, cudaDataType_t t, cublasOperation_t ta,
                  cublasOperation_t tb, float beta, bool capture, std::mt19937& g) {
  constexpr int batch = 3, m = 5, n = 7, k = 6;
  std::vector<problem> ps;
  for (int i = 0; i < batch; ++i) ps.emplace_back(g, m, n, k, ta, tb);
  const problem& p0 = ps[0];
  const std::size_t sa = p0.a.size(), sb = p0.b.size(), sc = p0.c0.size();
  std::vector<unsigned char> a(batch * sa * type_size(t)), b(batch * sb * type_size(t));
  std::vector<float> c(batch * sc);
  for (int i = 0; i < batch; ++i) {
    const auto ab = ps[i].bytes(ps[i].a, t), bb = ps[i].bytes(ps[i].b, t);
    std::memcpy(a.data() + i * ab.size(), ab.data(), ab.size());
    std::memcpy(b.data() + i * bb.size(), bb.data(), bb.size());
    for (std::size_t x = 0; x < sc; ++x) c[i * sc + x] = beta == 0.0f ? NAN : ps[i].c0[x];
  }
  dev_buf da(a.size()), db(b.size()), dc(c.size() * 4);
  must(cudaMemcpy(da.p, a.data(), a.size(), cudaMemcpyHostToDevice), "cudaMemcpy");
  must(cudaMemcpy(db.p, b.data(), b.size(), cudaMemcpyHostToDevice), "cudaMemcpy");
  must(cudaMemcpy(dc.p, c.data(), c.size() * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
  const float alpha = 1.0f;
  std::string error;
  auto call = [&] {
    return cublasGemmStridedBatchedEx(h, ta, tb, m, n, k, &alpha, da.p, t, p0.lda,
                                      static_cast<long long>(sa), db.p, t, p0.ldb,
                                      static_cast<long long>(sb), &beta, dc.p, CUDA_R_32F, p0.ldc,
                                      static_cast<long long>(sc), batch, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT);
  };
  if (!capture) {
    error = err(call());
  } else {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    error = err(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    if (error.empty()) {
      const std::string call_error = err(call());
      const std::string end_error = err(cudaStreamEndCapture(s, &graph));
      error = !call_error.empty() ? call_error : end_error;
    }
    if (error.empty()) error = err(cudaGraphInstantiate(&exec, graph, 0));
    if (error.empty()) error = err(cudaGraphLaunch(exec, s));
    if (exec) (void)cudaGraphExecDestroy(exec);
    if (graph) (void)cudaGraphDestroy(graph);
  }
  if (error.empty()) error = err(cudaStreamSynchronize(s));
  long long bad = -1;
  if (error.empty()) {
    must(cudaMemcpy(c.data(), dc.p, c.size() * 4, cudaMemcpyDeviceToHost), "cudaMemcpy");
    for (int i = 0; i < batch && bad < 0; ++i) {
      const std::vector<float> got(c.begin() + i * sc, c.begin() + (i + 1) * sc);
      const long long x = ps[i].mismatch(got, ps[i].reference(beta));
      if (x >= 0) bad = i * static_cast<long long>(sc) + x;
    }
  }
  const bool ok = error.empty() && bad < 0;
  emit(capture ? "graph_capture" : "gemm",
       kvs("api", "cublasGemmStridedBatchedEx") + ", " + kvs("ab", type_name(t)) + ", " +
           kvs("c", "CUDA_R_32F") + ", " + kvs("op", std::string(op_name(ta)) + op_name(tb)) + ", " +
           kv("beta", static_cast<long long>(beta)) + ", " + kvb("required", true) + ", " +
           kvb("ok", ok) + ", " + kvs("error", error.empty() && bad >= 0 ? "mismatch at C element " + std::to_string(bad) : error));
  if (!ok) ++failures;
  return ok;
}

//! One cublasGemmEx (16-bit sorted_grouped runs one per expert; the router's GEMMs in float).
bool gemm_ex_case(cublasHandle_t h, cudaStream_t s, cudaDataType_t t, cublasOperation_t ta,
                  cublasOperation_t tb, float beta, std::mt19937& g) {
  std::vector<problem> ps;
  ps.emplace_back(g, 9, 5, 7, ta, tb);
  const problem& p = ps[0];
  uploaded up(ps, t, beta);
  const float alpha = 1.0f;
  std::string error = err(cublasGemmEx(h, ta, tb, p.m, p.n, p.k, &alpha, up.a[0], t, p.lda, up.b[0], t,
                                       p.ldb, &beta, up.c[0], CUDA_R_32F, p.ldc, CUBLAS_COMPUTE_32F,
                                       CUBLAS_GEMM_DEFAULT));
  if (error.empty()) error = err(cudaStreamSynchronize(s));
  long long bad = -1;
  if (error.empty()) bad = p.mismatch(up.get_c(0, p), p.reference(beta));
  const bool ok = error.empty() && bad < 0;
  emit("gemm", kvs("api", "cublasGemmEx") + ", " + kvs("ab", type_name(t)) + ", " + kvs("c", "CUDA_R_32F") +
                   ", " + kvs("op", std::string(op_name(ta)) + op_name(tb)) + ", " +
                   kv("beta", static_cast<long long>(beta)) + ", " + kvb("required", true) + ", " +
                   kvb("ok", ok) + ", " +
                   kvs("error", error.empty() && bad >= 0 ? "mismatch at C element " + std::to_string(bad) : error));
  if (!ok) ++failures;
  return ok;
}

//! Grouped batched GEMM: three groups of different shapes (sizes 2, 1, 1).
bool grouped_case(cublasHandle_t h, cudaStream_t s, cudaDataType_t t, cublasOperation_t ta,
                  cublasOperation_t tb, float beta, bool capture, bool required, std::mt19937& g) {
  const int groups = 3;
  const int gm[groups] = {5, 8, 1}, gn[groups] = {7, 3, 4}, gk[groups] = {6, 9, 2};
  const int gsize[groups] = {2, 1, 1};
  std::vector<problem> ps;
  for (int i = 0; i < groups; ++i)
    for (int j = 0; j < gsize[i]; ++j) ps.emplace_back(g, gm[i], gn[i], gk[i], ta, tb);
  uploaded up(ps, t, beta);
  dev_buf pa(ps.size() * sizeof(void*)), pb(ps.size() * sizeof(void*)), pc(ps.size() * sizeof(void*));
  must(cudaMemcpy(pa.p, up.a.data(), ps.size() * sizeof(void*), cudaMemcpyHostToDevice), "cudaMemcpy");
  must(cudaMemcpy(pb.p, up.b.data(), ps.size() * sizeof(void*), cudaMemcpyHostToDevice), "cudaMemcpy");
  must(cudaMemcpy(pc.p, up.c.data(), ps.size() * sizeof(void*), cudaMemcpyHostToDevice), "cudaMemcpy");
  cublasOperation_t tas[groups], tbs[groups];
  int m[groups], n[groups], k[groups], lda[groups], ldb[groups], ldc[groups];
  float alpha[groups], betas[groups];
  for (int i = 0, first = 0; i < groups; first += gsize[i], ++i) {
    const problem& p = ps[static_cast<std::size_t>(first)];
    tas[i] = ta;
    tbs[i] = tb;
    m[i] = p.m;
    n[i] = p.n;
    k[i] = p.k;
    // Every problem of a group shares its leading dimensions (same shape, same padding).
    lda[i] = p.lda;
    ldb[i] = p.ldb;
    ldc[i] = p.ldc;
    alpha[i] = 1.0f;
    betas[i] = beta;
  }
  auto call = [&] {
    return cublasGemmGroupedBatchedEx(h, tas, tbs, m, n, k, alpha,
                                      static_cast<const void* const*>(pa.p), t, lda,
                                      static_cast<const void* const*>(pb.p), t, ldb, betas,
                                      static_cast<void* const*>(pc.p), CUDA_R_32F, ldc, groups,
                                      gsize, CUBLAS_COMPUTE_32F);
  };
  std::string error;
  if (!capture) {
    error = err(call());
  } else {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    error = err(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    if (error.empty()) {
      const std::string call_error = err(call());
      const std::string end_error = err(cudaStreamEndCapture(s, &graph));
      error = !call_error.empty() ? call_error : end_error;
    }
    if (error.empty()) error = err(cudaGraphInstantiate(&exec, graph, 0));
    if (error.empty()) error = err(cudaGraphLaunch(exec, s));
    if (exec) (void)cudaGraphExecDestroy(exec);
    if (graph) (void)cudaGraphDestroy(graph);
  }
  if (error.empty()) error = err(cudaStreamSynchronize(s));
  (void)cudaGetLastError();
  long long bad = -1;
  if (error.empty()) {
    for (std::size_t i = 0; i < ps.size() && bad < 0; ++i) {
      const long long x = ps[i].mismatch(up.get_c(i, ps[i]), ps[i].reference(beta));
      if (x >= 0) bad = static_cast<long long>(i) * 1000 + x;
    }
  }
  const bool ok = error.empty() && bad < 0;
  emit(capture ? "graph_capture" : "gemm",
       kvs("api", "cublasGemmGroupedBatchedEx") + ", " + kvs("ab", type_name(t)) + ", " +
           kvs("c", "CUDA_R_32F") + ", " + kvs("op", std::string(op_name(ta)) + op_name(tb)) + ", " +
           kv("beta", static_cast<long long>(beta)) + ", " + kvb("required", required) + ", " +
           kvb("ok", ok) + ", " +
           kvs("error", error.empty() && bad >= 0
                            ? "mismatch in problem " + std::to_string(bad / 1000) + " at C element " + std::to_string(bad % 1000)
                            : error));
  if (!ok && required) ++failures;
  return ok;
}

//! Temporary storage of cub::DeviceRadixSort::SortPairs (int32 keys, int64 values) for n
//! pairs over the low `bits` bits.
void cub_sizes(cudaStream_t s) {
  for (long long n : {2049LL, 8192LL, 65536LL, 1LL << 20, 1LL << 23}) {
    for (int bits : {4, 7, 13}) {
      std::size_t temp = 0;
      const std::string e = err(cub::DeviceRadixSort::SortPairs(
          nullptr, temp, static_cast<const std::int32_t*>(nullptr), static_cast<std::int32_t*>(nullptr),
          static_cast<const std::int64_t*>(nullptr), static_cast<std::int64_t*>(nullptr), n, 0, bits, s));
      emit("cub_sort_temp", kv("pairs", n) + ", " + kv("end_bit", static_cast<long long>(bits)) + ", " +
                                kv("temp_bytes", static_cast<long long>(temp)) + ", " + kvb("ok", e.empty()) +
                                ", " + kvs("error", e));
      if (!e.empty()) ++failures;
    }
  }
  // One real sort (stability checked): 65536 pairs over 4 bits.
  const int n = 65536;
  std::vector<std::int32_t> keys(n);
  std::vector<std::int64_t> vals(n);
  std::mt19937 g(7);
  for (int i = 0; i < n; ++i) {
    keys[i] = static_cast<std::int32_t>(g() % 9);  // experts 0..7 and the sentinel 8
    vals[i] = i;
  }
  dev_buf k_in(n * 4), k_out(n * 4), v_in(n * 8), v_out(n * 8);
  must(cudaMemcpy(k_in.p, keys.data(), n * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
  must(cudaMemcpy(v_in.p, vals.data(), n * 8, cudaMemcpyHostToDevice), "cudaMemcpy");
  std::size_t temp = 0;
  auto* ki = static_cast<std::int32_t*>(k_in.p);
  auto* ko = static_cast<std::int32_t*>(k_out.p);
  auto* vi = static_cast<std::int64_t*>(v_in.p);
  auto* vo = static_cast<std::int64_t*>(v_out.p);
  std::string e = err(cub::DeviceRadixSort::SortPairs(nullptr, temp, ki, ko, vi, vo, n, 0, 4, s));
  bool ok = e.empty();
  if (ok) {
    dev_buf t(temp);
    e = err(cub::DeviceRadixSort::SortPairs(t.p, temp, ki, ko, vi, vo, n, 0, 4, s));
    if (e.empty()) e = err(cudaStreamSynchronize(s));
    ok = e.empty();
    if (ok) {
      std::vector<std::int32_t> ks(n);
      std::vector<std::int64_t> vs(n);
      must(cudaMemcpy(ks.data(), ko, n * 4, cudaMemcpyDeviceToHost), "cudaMemcpy");
      must(cudaMemcpy(vs.data(), vo, n * 8, cudaMemcpyDeviceToHost), "cudaMemcpy");
      for (int i = 1; i < n && ok; ++i)
        ok = ks[i - 1] < ks[i] || (ks[i - 1] == ks[i] && vs[i - 1] < vs[i]);
      for (int i = 0; i < n && ok; ++i) ok = keys[static_cast<std::size_t>(vs[i])] == ks[i];
      if (!ok) e = "not a stable sort of the input";
    }
  }
  emit("cub_sort_run", kv("pairs", static_cast<long long>(n)) + ", " + kv("end_bit", 4LL) + ", " +
                           kvb("ok", ok) + ", " + kvs("error", e));
  if (!ok) ++failures;
}

}  // namespace

int main() {
  int count = 0;
  const cudaError_t st = cudaGetDeviceCount(&count);
  if (st == cudaErrorNoDevice || st == cudaErrorInsufficientDriver || (st == cudaSuccess && count == 0)) {
    emit("skip", kvs("reason", "no CUDA device: " + err(st)));
    return 77;
  }
  must(st, "cudaGetDeviceCount");

  int device = 0, driver = 0, runtime = 0;
  must(cudaGetDevice(&device), "cudaGetDevice");
  must(cudaDriverGetVersion(&driver), "cudaDriverGetVersion");
  must(cudaRuntimeGetVersion(&runtime), "cudaRuntimeGetVersion");
  cudaDeviceProp prop{};
  must(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  cublasHandle_t h = nullptr;
  must(cublasCreate(&h), "cublasCreate");
  int blas_version = 0;
  must(cublasGetVersion(h, &blas_version), "cublasGetVersion");
  emit("device", kv("devices", static_cast<long long>(count)) + ", " + kvs("name", prop.name) + ", " +
                     kvs("compute_capability", std::to_string(prop.major) + "." + std::to_string(prop.minor)) + ", " +
                     kv("multiprocessors", static_cast<long long>(prop.multiProcessorCount)) + ", " +
                     kv("global_memory_bytes", static_cast<long long>(prop.totalGlobalMem)) + ", " +
                     kv("l2_bytes", static_cast<long long>(prop.l2CacheSize)) + ", " +
                     kv("shared_memory_per_block_optin", static_cast<long long>(prop.sharedMemPerBlockOptin)));
  emit("versions", kv("driver", static_cast<long long>(driver)) + ", " + kv("runtime", static_cast<long long>(runtime)) +
                       ", " + kv("cublas", static_cast<long long>(blas_version)) + ", " +
                       kv("cublas_header", static_cast<long long>(CUBLAS_VERSION)) + ", " +
                       kv("cub", static_cast<long long>(CUB_VERSION)));

  cudaStream_t s = nullptr;
  must(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  must(cublasSetStream(h, s), "cublasSetStream");
  must(cublasSetAtomicsMode(h, CUBLAS_ATOMICS_NOT_ALLOWED), "cublasSetAtomicsMode");

  std::mt19937 g(20261130u);
  const cudaDataType_t types[] = {CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF};
  const cublasOperation_t ops[3][2] = {{CUBLAS_OP_T, CUBLAS_OP_N}, {CUBLAS_OP_N, CUBLAS_OP_N}, {CUBLAS_OP_N, CUBLAS_OP_T}};
  for (cudaDataType_t t : types)
    for (const auto& op : ops)
      for (float beta : {0.0f, 1.0f}) {
        strided_case(h, s, t, op[0], op[1], beta, false, g);
        gemm_ex_case(h, s, t, op[0], op[1], beta, g);
        // The backend groups float only (cuBLAS's grouped table has C of the input type for
        // 16-bit A/B): 16-bit with C = float is probed, not required (a future cuBLAS may add it).
        grouped_case(h, s, t, op[0], op[1], beta, false, t == CUDA_R_32F, g);
      }
  cub_sizes(s);
  for (cudaDataType_t t : types) {
    strided_case(h, s, t, CUBLAS_OP_T, CUBLAS_OP_N, 0.0f, true, g);
    grouped_case(h, s, t, CUBLAS_OP_T, CUBLAS_OP_N, 0.0f, true, false, g);
  }
  (void)cudaGetLastError();
  emit("summary", kv("failures", static_cast<long long>(failures)) + ", " + kvb("ok", failures == 0));
  (void)cublasDestroy(h);
  (void)cudaStreamDestroy(s);
  return failures == 0 ? 0 : 1;
}
