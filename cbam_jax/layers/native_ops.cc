// XLA:CPU FFI handlers: oneDNN 2-D convolutions (forward, input gradient, kernel gradient); the
// gradient of a max reduction sent to the first maximum (one vectorisable pass; XLA:CPU's variadic
// argmax reduction is not vectorised); and passes that read bfloat16 or float32 activations once
// where XLA:CPU converts them to float32 copies first: CBAM's channel gate (global average and max
// pools, x * s), the stem's max pool, and BatchNorm's statistics and gradient sums (sections below).
//
// Layouts are JAX's: activations NHWC, kernels HWIO. Activations stay NHWC (oneDNN's JIT kernels
// run channels-last directly, as PyTorch's channels-last path does); the kernel is reordered into
// the layout oneDNN prefers for the shape (a few KB to MB, cheap). float32 and bfloat16 (AMX or
// AVX-512 bf16 where the CPU has them), float32 accumulation. Built by cbam_jax/layers/native.py.
//
// Grouped convolutions (XLA's feature_group_count G, read off the shapes: G = Cin / kernel's I):
// JAX's kernel (KH, KW, Cin/G, Cout) splits its output axis group-major, Cout = G x Cout/G, so in
// memory it is (KH, KW, Cin/G, G, Cout/G): oneDNN's grouped weights (G, Cout/G, Cin/G, KH, KW) in
// the format tag hwigo (= decab). Depthwise convolutions are G = Cin (oneDNN's own kernels for them).

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <vector>
#include <algorithm>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

memory::data_type DnnlType(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32: return memory::data_type::f32;
    case ffi::DataType::BF16: return memory::data_type::bf16;
    default: return memory::data_type::undef;
  }
}

// One cached convolution: its primitive, and what the kernel needs to get into (or out of) the
// layout that the primitive chose.
struct Entry {
  dnnl::primitive conv;
  memory::desc kernel_md;       // the primitive's kernel layout
  memory::desc user_kernel_md;  // HWIO
  memory::desc src_md, dst_md;  // NHWC: the data operands (for the input gradient: dx and dy)
  memory::desc scratchpad_md;   // user-managed scratchpad, allocated per call (concurrent calls are safe)
  dnnl::primitive kernel_reorder;  // HWIO <-> kernel_md, when they differ
};

enum class Kind { kForward = 0, kInputGrad = 1, kKernelGrad = 2 };

struct Geometry {
  memory::dims src, kernel, dst;  // oneDNN logical dims: NCHW, OIHW (grouped: GOIHW), NCHW
  memory::dims strides, dilates, pad_lo, pad_hi;
  memory::data_type src_type, kernel_type, dst_type;
};

std::string Key(Kind kind, const Geometry& g) {
  std::ostringstream out;
  out << static_cast<int>(kind) << ':' << static_cast<int>(g.src_type) << ',' << static_cast<int>(g.kernel_type)
      << ',' << static_cast<int>(g.dst_type);
  for (const memory::dims* dims : {&g.src, &g.kernel, &g.dst, &g.strides, &g.dilates, &g.pad_lo, &g.pad_hi}) {
    out << '|';
    for (auto d : *dims) out << d << ',';
  }
  return out.str();
}

std::shared_ptr<Entry> MakeEntry(Kind kind, const Geometry& g) {
  auto& engine = Engine();
  auto entry = std::make_shared<Entry>();
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const tag user_kernel_tag = g.kernel.size() == 5 ? tag::hwigo : tag::hwio;  // JAX's HWIO, grouped or not
  entry->user_kernel_md = memory::desc(g.kernel, g.kernel_type, user_kernel_tag);
  // The kernel gradient's output may be float32 for bfloat16 data; its forward hint has the data's type.
  memory::desc any_kernel(g.kernel, kind == Kind::kKernelGrad ? g.src_type : g.kernel_type, tag::any);
  // The forward primitive descriptor: the forward itself, or the backward ones' hint.
  memory::desc fwd_src(g.src, g.src_type, tag::nhwc), fwd_dst(g.dst, g.dst_type, tag::nhwc);
  dnnl::convolution_forward::primitive_desc fwd(
      engine, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, fwd_src, any_kernel, fwd_dst,
      g.strides, g.dilates, g.pad_lo, g.pad_hi, attr);
  entry->src_md = fwd_src;
  entry->dst_md = fwd_dst;
  if (kind == Kind::kForward) {
    entry->conv = dnnl::convolution_forward(fwd);
    entry->kernel_md = fwd.weights_desc();
    entry->scratchpad_md = fwd.scratchpad_desc();
  } else if (kind == Kind::kInputGrad) {
    auto make_pd = [&] {
      return dnnl::convolution_backward_data::primitive_desc(engine, dnnl::algorithm::convolution_direct, fwd_src,
                                                             any_kernel, fwd_dst, g.strides, g.dilates, g.pad_lo,
                                                             g.pad_hi, fwd, attr);
    };
    auto pd = make_pd();
    // Depthwise: oneDNN 3.2 lists a general grouped kernel (brgconv_strided) before its depthwise
    // one for strided bfloat16 input gradients, 5-100x slower than the depthwise kernel
    // (docs/performance.md); take the depthwise kernel where it is on the list.
    const bool depthwise = g.kernel.size() == 5 && g.kernel[1] == 1 && g.kernel[2] == 1;
    auto is_depthwise_kernel = [&] { return std::string(pd.impl_info_str()).rfind("jit_dw", 0) == 0; };
    if (depthwise && !is_depthwise_kernel()) {
      bool found = false;
      while (!found && pd.next_impl()) found = is_depthwise_kernel();
      if (!found) pd = make_pd();  // none: oneDNN's first choice
    }
    entry->conv = dnnl::convolution_backward_data(pd);
    entry->kernel_md = pd.weights_desc();
    entry->scratchpad_md = pd.scratchpad_desc();
  } else {
    // float32 kernel gradient whatever the data type (bf16 accumulators in oneDNN's bf16 kernel
    // gradients were slow and lossy); converted to the kernel's type by the reorder.
    memory::desc any_f32_kernel(g.kernel, memory::data_type::f32, tag::any);
    dnnl::convolution_backward_weights::primitive_desc pd(
        engine, dnnl::algorithm::convolution_direct, fwd_src, any_f32_kernel, fwd_dst, g.strides, g.dilates,
        g.pad_lo, g.pad_hi, fwd, attr);
    entry->conv = dnnl::convolution_backward_weights(pd);
    entry->kernel_md = pd.diff_weights_desc();
    entry->scratchpad_md = pd.scratchpad_desc();
  }
  if (entry->kernel_md != entry->user_kernel_md) {
    entry->kernel_reorder = kind == Kind::kKernelGrad
        ? dnnl::reorder(dnnl::reorder::primitive_desc(engine, entry->kernel_md, engine, entry->user_kernel_md))
        : dnnl::reorder(dnnl::reorder::primitive_desc(engine, entry->user_kernel_md, engine, entry->kernel_md));
  }
  return entry;
}

std::shared_ptr<Entry> GetEntry(Kind kind, const Geometry& g) {
  static std::mutex mutex;
  static std::unordered_map<std::string, std::shared_ptr<Entry>> cache;
  std::string key = Key(kind, g);
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto entry = MakeEntry(kind, g);
  std::lock_guard<std::mutex> lock(mutex);
  return cache.emplace(key, entry).first->second;
}

memory::dims ToDims(ffi::Span<const int64_t> span) { return memory::dims(span.begin(), span.end()); }

// Geometry from the three NHWC/HWIO shapes: x (N, H, W, Cin), kernel (KH, KW, Cin/G, Cout), y (N, Ho, Wo, Cout),
// with G = Cin / (the kernel's input channels) feature groups.
ffi::Error MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k, ffi::Span<const int64_t> y,
                        ffi::DataType x_type, ffi::DataType k_type, ffi::DataType y_type,
                        ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilation,
                        ffi::Span<const int64_t> padding, Geometry* g) {
  if (x.size() != 4 || k.size() != 4 || y.size() != 4 || strides.size() != 2 || dilation.size() != 2 ||
      padding.size() != 4) {
    return ffi::Error::InvalidArgument("onednn conv: expected rank-4 NHWC/HWIO operands and 2-D attributes");
  }
  if (k[2] < 1 || x[3] < k[2] || x[3] % k[2] != 0 || k[3] % (x[3] / k[2]) != 0 || y[3] != k[3]) {
    return ffi::Error::InvalidArgument("onednn conv: the input channels must be G x the kernel's and the output "
                                       "channels a multiple of G (feature groups)");
  }
  const int64_t groups = x[3] / k[2];
  g->src = {x[0], x[3], x[1], x[2]};
  if (groups == 1) {
    g->kernel = {k[3], k[2], k[0], k[1]};
  } else {
    g->kernel = {groups, k[3] / groups, k[2], k[0], k[1]};
  }
  g->dst = {y[0], y[3], y[1], y[2]};
  g->strides = ToDims(strides);
  g->dilates = {dilation[0] - 1, dilation[1] - 1};
  g->pad_lo = {padding[0], padding[2]};
  g->pad_hi = {padding[1], padding[3]};
  g->src_type = DnnlType(x_type);
  g->kernel_type = DnnlType(k_type);
  g->dst_type = DnnlType(y_type);
  if (g->src_type == memory::data_type::undef || g->kernel_type == memory::data_type::undef ||
      g->dst_type == memory::data_type::undef) {
    return ffi::Error::InvalidArgument("onednn conv: only float32 and bfloat16 are supported");
  }
  return ffi::Error::Success();
}

template <typename F>
ffi::Error Guarded(F&& body) {
  try {
    return body();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(e.what());
  }
}

// Runs `kind` on NHWC `src`/`dst` data (forward: x, y; input gradient: dx, dy; kernel gradient:
// x, dy) and the HWIO `kernel` (an output for the kernel gradient).
ffi::Error Run(Kind kind, const Geometry& g, void* src, void* dst, void* kernel) {
  auto entry = GetEntry(kind, g);
  auto& engine = Engine();
  dnnl::stream stream(engine);
  memory src_mem(entry->src_md, engine, src), dst_mem(entry->dst_md, engine, dst);
  memory user_kernel(entry->user_kernel_md, engine, kernel);
  memory kernel_mem = user_kernel;
  if (entry->kernel_reorder) kernel_mem = memory(entry->kernel_md, engine);
  memory scratchpad(entry->scratchpad_md, engine);
  if (kind != Kind::kKernelGrad && entry->kernel_reorder) {
    entry->kernel_reorder.execute(stream, {{DNNL_ARG_FROM, user_kernel}, {DNNL_ARG_TO, kernel_mem}});
  }
  if (kind == Kind::kForward) {
    entry->conv.execute(stream, {{DNNL_ARG_SRC, src_mem}, {DNNL_ARG_WEIGHTS, kernel_mem}, {DNNL_ARG_DST, dst_mem},
                                 {DNNL_ARG_SCRATCHPAD, scratchpad}});
  } else if (kind == Kind::kInputGrad) {
    entry->conv.execute(stream, {{DNNL_ARG_DIFF_DST, dst_mem}, {DNNL_ARG_WEIGHTS, kernel_mem},
                                 {DNNL_ARG_DIFF_SRC, src_mem}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
  } else {
    entry->conv.execute(stream, {{DNNL_ARG_SRC, src_mem}, {DNNL_ARG_DIFF_DST, dst_mem},
                                 {DNNL_ARG_DIFF_WEIGHTS, kernel_mem}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
    if (entry->kernel_reorder) {
      entry->kernel_reorder.execute(stream, {{DNNL_ARG_FROM, kernel_mem}, {DNNL_ARG_TO, user_kernel}});
    }
  }
  stream.wait();
  return ffi::Error::Success();
}

#define CONV_ATTRS                                                                       \
  ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> padding

// y = conv(x, kernel): x (N, H, W, Cin), kernel (KH, KW, Cin, Cout) -> y (N, Ho, Wo, Cout).
ffi::Error ForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> y, CONV_ATTRS) {
  return Guarded([&]() -> ffi::Error {
    Geometry g;
    if (auto e = MakeGeometry(x.dimensions(), kernel.dimensions(), y->dimensions(), x.element_type(),
                              kernel.element_type(), y->element_type(), strides, dilation, padding, &g);
        e.failure()) return e;
    return Run(Kind::kForward, g, x.untyped_data(), y->untyped_data(), kernel.untyped_data());
  });
}

// Input gradient: dy (N, Ho, Wo, Cout), kernel -> dx (N, H, W, Cin).
ffi::Error InputGradImpl(ffi::AnyBuffer dy, ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> dx, CONV_ATTRS) {
  return Guarded([&]() -> ffi::Error {
    Geometry g;
    if (auto e = MakeGeometry(dx->dimensions(), kernel.dimensions(), dy.dimensions(), dx->element_type(),
                              kernel.element_type(), dy.element_type(), strides, dilation, padding, &g);
        e.failure()) return e;
    return Run(Kind::kInputGrad, g, dx->untyped_data(), dy.untyped_data(), kernel.untyped_data());
  });
}

// Kernel gradient: x (N, H, W, Cin), dy (N, Ho, Wo, Cout) -> dkernel (KH, KW, Cin, Cout).
ffi::Error KernelGradImpl(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dkernel, CONV_ATTRS) {
  return Guarded([&]() -> ffi::Error {
    Geometry g;
    if (auto e = MakeGeometry(x.dimensions(), dkernel->dimensions(), dy.dimensions(), x.element_type(),
                              dkernel->element_type(), dy.element_type(), strides, dilation, padding, &g);
        e.failure()) return e;
    return Run(Kind::kKernelGrad, g, x.untyped_data(), dy.untyped_data(), dkernel->untyped_data());
  });
}

// ----------------------------------------------------------------------------- max gradient

inline float ToFloat(float v) { return v; }
inline float ToFloat(uint16_t bf16) {
  uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// x (P, N, Q), grad (P, Q) -> out (P, N, Q): grad[p, q] at the first n maximising x[p, n, q], 0
// elsewhere (NaN counts as the maximum, as jnp.argmax). Blocks of Q run in parallel.
template <typename T>
void MaxGrad(const T* x, const T* grad, T* out, int64_t P, int64_t N, int64_t Q) {
  if (Q == 1) {  // a max over the last axis (the spatial gate's channel max): contiguous rows
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < P; ++p) {
      const T* row = x + p * N;
      float best = ToFloat(row[0]);
      int64_t index = 0;
      for (int64_t n = 1; n < N; ++n) {
        const float v = ToFloat(row[n]);
        if (v > best || (v != v && best == best)) best = v, index = n;
      }
      T* out_row = out + p * N;
      std::fill(out_row, out_row + N, T(0));
      out_row[index] = grad[p];
    }
    return;
  }
  constexpr int64_t kBlock = 512;
  const int64_t blocks = (Q + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < P * blocks; ++task) {
    const int64_t p = task / blocks, q0 = (task % blocks) * kBlock, width = std::min(kBlock, Q - q0);
    float best[kBlock];
    int32_t index[kBlock];
    const T* xp = x + p * N * Q + q0;
    for (int64_t q = 0; q < width; ++q) {
      best[q] = ToFloat(xp[q]);
      index[q] = 0;
    }
    for (int64_t n = 1; n < N; ++n) {
      const T* row = xp + n * Q;
      for (int64_t q = 0; q < width; ++q) {
        const float v = ToFloat(row[q]);
        // strictly greater keeps the first maximum; a NaN wins once and stays (v > NaN is false)
        const bool take = (v > best[q]) || (v != v && best[q] == best[q]);
        best[q] = take ? v : best[q];
        index[q] = take ? static_cast<int32_t>(n) : index[q];
      }
    }
    T* op = out + p * N * Q + q0;
    const T* gp = grad + p * Q + q0;
    for (int64_t n = 0; n < N; ++n) {
      T* row = op + n * Q;
      for (int64_t q = 0; q < width; ++q) row[q] = index[q] == n ? gp[q] : T(0);
    }
  }
}

// Whether a buffer's dimensions are exactly `expected`: the handlers check every buffer, so that a
// wrong call is an error, never a read or write outside a buffer.
template <typename Dims>
bool HasShape(const Dims& dims, std::initializer_list<int64_t> expected) {
  return dims.size() == expected.size() && std::equal(expected.begin(), expected.end(), dims.begin());
}
// Whether an array of these dimensions has no elements (the kernels read each reduction's first element).
template <typename Dims>
bool Empty(const Dims& dims) {
  return std::find(dims.begin(), dims.end(), int64_t{0}) != dims.end();
}

ffi::Error MaxGradImpl(ffi::AnyBuffer x, ffi::AnyBuffer grad, ffi::Result<ffi::AnyBuffer> out) {
  auto dims = x.dimensions();
  if (dims.size() != 3 || !HasShape(grad.dimensions(), {dims[0], dims[2]}) || !(out->dimensions() == dims) ||
      x.element_type() != grad.element_type() || out->element_type() != x.element_type()) {
    return ffi::Error::InvalidArgument("max_grad: expected x (P, N, Q) and grad (P, Q) of one dtype");
  }
  if (Empty(dims)) return ffi::Error::InvalidArgument("max_grad: x must not be empty");
  const int64_t P = dims[0], N = dims[1], Q = dims[2];
  switch (x.element_type()) {
    case ffi::DataType::F32:
      MaxGrad(static_cast<const float*>(x.untyped_data()), static_cast<const float*>(grad.untyped_data()),
              static_cast<float*>(out->untyped_data()), P, N, Q);
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      MaxGrad(static_cast<const uint16_t*>(x.untyped_data()), static_cast<const uint16_t*>(grad.untyped_data()),
              static_cast<uint16_t*>(out->untyped_data()), P, N, Q);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("max_grad: only float32 and bfloat16 are supported");
  }
}

// ----------------------------------------------------------------------------- CBAM gates and the stem's max pool
//
// XLA:CPU runs the gates' elementwise work and reductions on bfloat16 as float32 loop fusions that
// materialise float32 copies (the channel gate's scale gradient became a float32 product map and a
// reduce-window tree). These kernels read bfloat16 or float32 once, accumulate in float32 and write
// the data's type. Layout as MaxGrad: x (P, N, Q), reduced along N (the channel gate: P = B, N = H*W,
// Q = C). Q-blocks vectorise; a small Q (the spatial gate's Q = 1) runs scalar: XLA's own fusions
// were faster for the spatial gate, which keeps them.

inline void Store(float* out, float v) { *out = v; }
inline void Store(uint16_t* out, float v) {  // float32 -> bfloat16, round to nearest even
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = bits + 0x7FFFu + ((bits >> 16) & 1u), quiet_nan = bits | 0x00400000u;
  *out = static_cast<uint16_t>((v != v ? quiet_nan : rounded) >> 16);  // branch-free: vectorises
}
inline float Rounded(float v, float) { return v; }
inline float Rounded(float v, uint16_t) {  // v rounded to bfloat16, as a float
  uint16_t b;
  Store(&b, v);
  return ToFloat(b);
}

constexpr int64_t kLanes = 512;  // Q-block of one task: float32 accumulators on the stack
// Positions along a reduction are tracked as float32 (one lane width with the values, so the argmax
// loops vectorise), exact below 2^24; the handlers refuse more (native.MAX_POSITIONS, checked by native.usable_for).
constexpr int64_t kMaxPositions = int64_t{1} << 24;
constexpr int64_t kChunk = 64;   // rows summed into a partial before the running total (two-level sum)

// The tasks of an (P, N, Q) pass: (p, block of Q) pairs.
struct Blocks {
  int64_t P, N, Q, blocks;
  Blocks(int64_t p, int64_t n, int64_t q) : P(p), N(n), Q(q), blocks((q + kLanes - 1) / kLanes) {}
  int64_t tasks() const { return P * blocks; }
  int64_t p(int64_t task) const { return task / blocks; }
  int64_t q0(int64_t task) const { return (task % blocks) * kLanes; }
  int64_t width(int64_t task) const { return std::min(kLanes, Q - q0(task)); }
};

// For each q of a block: the first n maximising xp[n * Q + q] (NaN counts as the maximum), in index
// (as float: N < kMaxPositions).
template <typename T>
void FirstMax(const T* xp, int64_t N, int64_t Q, int64_t width, float* best, float* index) {
  for (int64_t q = 0; q < width; ++q) best[q] = ToFloat(xp[q]), index[q] = 0.f;
  for (int64_t n = 1; n < N; ++n) {
    const T* row = xp + n * Q;
    const float at = static_cast<float>(n);
    for (int64_t q = 0; q < width; ++q) {
      const float v = ToFloat(row[q]);
      const bool take = (v > best[q]) || (v != v && best[q] == best[q]);
      best[q] = take ? v : best[q];
      index[q] = take ? at : index[q];
    }
  }
}

// mean[p, q] = sum_n x[p, n, q] / N and max[p, q] = max_n x[p, n, q] (NaN propagates), float32.
template <typename T>
void AvgMax(const T* x, float* mean, float* max, int64_t P, int64_t N, int64_t Q) {
  const Blocks b(P, N, Q);
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < b.tasks(); ++task) {
    const int64_t p = b.p(task), q0 = b.q0(task), width = b.width(task);
    float total[kLanes], partial[kLanes], best[kLanes];
    const T* xp = x + p * N * Q + q0;
    for (int64_t q = 0; q < width; ++q) total[q] = 0.f, best[q] = ToFloat(xp[q]);
    for (int64_t n0 = 0; n0 < N; n0 += kChunk) {
      for (int64_t q = 0; q < width; ++q) partial[q] = 0.f;
      for (int64_t n = n0; n < std::min(N, n0 + kChunk); ++n) {
        const T* row = xp + n * Q;
        for (int64_t q = 0; q < width; ++q) {
          const float v = ToFloat(row[q]);
          partial[q] += v;
          best[q] = (v > best[q] || v != v) ? v : best[q];
        }
      }
      for (int64_t q = 0; q < width; ++q) total[q] += partial[q];
    }
    for (int64_t q = 0; q < width; ++q) {
      mean[p * Q + q0 + q] = total[q] / static_cast<float>(N);
      max[p * Q + q0 + q] = best[q];
    }
  }
}

// dx[p, n, q] = d_mean[p, q] / N + (d_max[p, q] at the first maximum along n, else 0), in x's type.
template <typename T>
void AvgMaxGrad(const T* x, const float* d_mean, const float* d_max, T* dx, int64_t P, int64_t N, int64_t Q) {
  const Blocks b(P, N, Q);
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < b.tasks(); ++task) {
    const int64_t p = b.p(task), q0 = b.q0(task), width = b.width(task);
    float best[kLanes], spread[kLanes], peak[kLanes], index[kLanes];
    FirstMax(x + p * N * Q + q0, N, Q, width, best, index);
    for (int64_t q = 0; q < width; ++q) {
      spread[q] = d_mean[p * Q + q0 + q] / static_cast<float>(N);
      peak[q] = spread[q] + d_max[p * Q + q0 + q];
    }
    for (int64_t n = 0; n < N; ++n) {
      T* row = dx + (p * N + n) * Q + q0;
      const float at = static_cast<float>(n);
      for (int64_t q = 0; q < width; ++q) Store(row + q, index[q] == at ? peak[q] : spread[q]);
    }
  }
}

// The gradient of y = x * s (s broadcast along n, rounded to x's type first, as `x * s.astype(x.dtype)`):
// dx[p, n, q] = g * s[p, q] in x's type, ds[p, q] = sum_n g * x in float32.
template <typename T>
void GateGrad(const T* x, const T* g, const float* s, T* dx, float* ds, int64_t P, int64_t N, int64_t Q) {
  const Blocks b(P, N, Q);
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < b.tasks(); ++task) {
    const int64_t p = b.p(task), q0 = b.q0(task), width = b.width(task);
    float total[kLanes], partial[kLanes], scale[kLanes];
    for (int64_t q = 0; q < width; ++q) total[q] = 0.f, scale[q] = Rounded(s[p * Q + q0 + q], T());
    for (int64_t n0 = 0; n0 < N; n0 += kChunk) {
      for (int64_t q = 0; q < width; ++q) partial[q] = 0.f;
      for (int64_t n = n0; n < std::min(N, n0 + kChunk); ++n) {
        const int64_t offset = (p * N + n) * Q + q0;
        for (int64_t q = 0; q < width; ++q) {
          const float gv = ToFloat(g[offset + q]);
          partial[q] += gv * ToFloat(x[offset + q]);
          Store(dx + offset + q, gv * scale[q]);
        }
      }
      for (int64_t q = 0; q < width; ++q) total[q] += partial[q];
    }
    for (int64_t q = 0; q < width; ++q) ds[p * Q + q0 + q] = total[q];
  }
}

// PyTorch's max_pool2d (square window, stride, padding that never wins: as -inf), NHWC:
// x (B, H, W, C) -> out (B, Ho, Wo, C). NaN propagates, as XLA's max.
template <typename T>
void MaxPool(const T* x, T* out, int64_t B, int64_t H, int64_t W, int64_t C, int64_t Ho, int64_t Wo,
             int64_t window, int64_t stride, int64_t pad) {
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < B * Ho; ++task) {
    const int64_t b = task / Ho, oh = task % Ho;
    const int64_t h0 = std::max<int64_t>(0, oh * stride - pad), h1 = std::min(H, oh * stride - pad + window);
    std::vector<float> best(C);
    for (int64_t ow = 0; ow < Wo; ++ow) {
      const int64_t w0 = std::max<int64_t>(0, ow * stride - pad), w1 = std::min(W, ow * stride - pad + window);
      const T* first = x + ((b * H + h0) * W + w0) * C;
      for (int64_t c = 0; c < C; ++c) best[c] = ToFloat(first[c]);
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t w = w0; w < w1; ++w) {
          const T* tap = x + ((b * H + h) * W + w) * C;
          for (int64_t c = 0; c < C; ++c) {
            const float v = ToFloat(tap[c]);
            best[c] = (v > best[c] || v != v) ? v : best[c];
          }
        }
      }
      T* o = out + ((b * Ho + oh) * Wo + ow) * C;
      for (int64_t c = 0; c < C; ++c) Store(o + c, best[c]);
    }
  }
}

// Its gradient: each output's gradient to the first maximum of its window in row-major order (NaN
// counts as the maximum), summed in float32 where windows overlap: g (B, Ho, Wo, C) -> dx (B, H, W, C).
template <typename T>
void MaxPoolGrad(const T* x, const T* g, T* dx, int64_t B, int64_t H, int64_t W, int64_t C, int64_t Ho,
                 int64_t Wo, int64_t window, int64_t stride, int64_t pad) {
  constexpr int64_t kChannels = 32;  // a task: one image, a block of channels
  const int64_t blocks = (C + kChannels - 1) / kChannels;
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < B * blocks; ++task) {
    const int64_t b = task / blocks, c0 = (task % blocks) * kChannels, width = std::min(kChannels, C - c0);
    std::vector<float> sum(H * W * width, 0.f);
    float best[kChannels], index[kChannels];  // index as float: H * W < kMaxPositions
    for (int64_t oh = 0; oh < Ho; ++oh) {
      const int64_t h0 = std::max<int64_t>(0, oh * stride - pad), h1 = std::min(H, oh * stride - pad + window);
      for (int64_t ow = 0; ow < Wo; ++ow) {
        const int64_t w0 = std::max<int64_t>(0, ow * stride - pad), w1 = std::min(W, ow * stride - pad + window);
        const int64_t start = h0 * W + w0;
        const T* first = x + (b * H * W + start) * C + c0;
        for (int64_t c = 0; c < width; ++c) best[c] = ToFloat(first[c]), index[c] = static_cast<float>(start);
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = w0; w < w1; ++w) {
            const float at = static_cast<float>(h * W + w);
            const T* tap = x + (b * H * W + h * W + w) * C + c0;
            for (int64_t c = 0; c < width; ++c) {
              const float v = ToFloat(tap[c]);
              const bool take = (v > best[c]) || (v != v && best[c] == best[c]);
              best[c] = take ? v : best[c];
              index[c] = take ? at : index[c];
            }
          }
        }
        const T* gp = g + ((b * Ho + oh) * Wo + ow) * C + c0;
        for (int64_t c = 0; c < width; ++c) sum[static_cast<int64_t>(index[c]) * width + c] += ToFloat(gp[c]);
      }
    }
    for (int64_t at = 0; at < H * W; ++at) {
      T* d = dx + (b * H * W + at) * C + c0;
      for (int64_t c = 0; c < width; ++c) Store(d + c, sum[at * width + c]);
    }
  }
}

// Dispatch on float32 / bfloat16 with the buffers' data as T.
template <typename F>
ffi::Error ForType(ffi::DataType type, const char* name, F&& body) {
  switch (type) {
    case ffi::DataType::F32: body(float()); return ffi::Error::Success();
    case ffi::DataType::BF16: body(uint16_t()); return ffi::Error::Success();
    default: return ffi::Error::InvalidArgument(std::string(name) + ": only float32 and bfloat16 are supported");
  }
}

template <typename T>
const T* In(const ffi::AnyBuffer& b) { return static_cast<const T*>(b.untyped_data()); }
template <typename T>
T* Out(ffi::Result<ffi::AnyBuffer>& b) { return static_cast<T*>(b->untyped_data()); }

ffi::Error AvgMaxImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> mean, ffi::Result<ffi::AnyBuffer> max) {
  auto d = x.dimensions();
  if (d.size() != 3 || !HasShape(mean->dimensions(), {d[0], d[2]}) || !HasShape(max->dimensions(), {d[0], d[2]}) ||
      mean->element_type() != ffi::DataType::F32 || max->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("avg_max: expected x (P, N, Q) and float32 outputs (P, Q)");
  if (Empty(d)) return ffi::Error::InvalidArgument("avg_max: x must not be empty");
  return ForType(x.element_type(), "avg_max", [&](auto t) {
    using T = decltype(t);
    AvgMax(In<T>(x), Out<float>(mean), Out<float>(max), d[0], d[1], d[2]);
  });
}

ffi::Error AvgMaxGradImpl(ffi::AnyBuffer x, ffi::AnyBuffer d_mean, ffi::AnyBuffer d_max,
                          ffi::Result<ffi::AnyBuffer> dx) {
  auto d = x.dimensions();
  if (d.size() != 3 || !HasShape(d_mean.dimensions(), {d[0], d[2]}) || !HasShape(d_max.dimensions(), {d[0], d[2]}) ||
      !(dx->dimensions() == d) || d_mean.element_type() != ffi::DataType::F32 ||
      d_max.element_type() != ffi::DataType::F32 || dx->element_type() != x.element_type())
    return ffi::Error::InvalidArgument("avg_max_grad: expected x (P, N, Q), float32 d_mean and d_max (P, Q)");
  if (Empty(d)) return ffi::Error::InvalidArgument("avg_max_grad: x must not be empty");
  if (d[1] >= kMaxPositions) return ffi::Error::InvalidArgument("avg_max_grad: N must be below 2^24");
  return ForType(x.element_type(), "avg_max_grad", [&](auto t) {
    using T = decltype(t);
    AvgMaxGrad(In<T>(x), In<float>(d_mean), In<float>(d_max), Out<T>(dx), d[0], d[1], d[2]);
  });
}

ffi::Error GateGradImpl(ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::AnyBuffer s, ffi::Result<ffi::AnyBuffer> dx,
                        ffi::Result<ffi::AnyBuffer> ds) {
  auto d = x.dimensions();
  if (d.size() != 3 || !(g.dimensions() == d) || !(dx->dimensions() == d) || !HasShape(s.dimensions(), {d[0], d[2]}) ||
      !HasShape(ds->dimensions(), {d[0], d[2]}) || g.element_type() != x.element_type() ||
      dx->element_type() != x.element_type() || s.element_type() != ffi::DataType::F32 ||
      ds->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("gate_grad: expected x and g (P, N, Q) of one dtype and float32 s (P, Q)");
  return ForType(x.element_type(), "gate_grad", [&](auto t) {
    using T = decltype(t);
    GateGrad(In<T>(x), In<T>(g), In<float>(s), Out<T>(dx), Out<float>(ds), d[0], d[1], d[2]);
  });
}

#define POOL_ATTRS int64_t window, int64_t stride, int64_t padding

// Whether x (B, H, W, C) pools into (B, Ho, Wo, C) with these attributes (padding < window: no
// window lies in the padding alone).
template <typename Dims>
bool PoolShapes(const Dims& x, const Dims& out, POOL_ATTRS) {
  if (x.size() != 4 || out.size() != 4 || stride < 1 || padding < 0 || padding >= window) return false;
  const auto size = [&](int64_t n) { return (n + 2 * padding - window) / stride + 1; };
  return HasShape(out, {x[0], size(x[1]), size(x[2]), x[3]});
}

ffi::Error MaxPoolImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out, POOL_ATTRS) {
  auto d = x.dimensions();
  auto o = out->dimensions();
  if (!PoolShapes(d, o, window, stride, padding) || out->element_type() != x.element_type())
    return ffi::Error::InvalidArgument("max_pool: expected x (B, H, W, C) and out (B, Ho, Wo, C) of one dtype, "
                                       "0 <= padding < window, stride >= 1");
  if (Empty(d)) return ffi::Error::InvalidArgument("max_pool: x must not be empty");
  return ForType(x.element_type(), "max_pool", [&](auto t) {
    using T = decltype(t);
    MaxPool(In<T>(x), Out<T>(out), d[0], d[1], d[2], d[3], o[1], o[2], window, stride, padding);
  });
}

ffi::Error MaxPoolGradImpl(ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> dx, POOL_ATTRS) {
  auto d = x.dimensions();
  auto o = g.dimensions();
  if (!PoolShapes(d, o, window, stride, padding) || !(dx->dimensions() == d) || g.element_type() != x.element_type() ||
      dx->element_type() != x.element_type())
    return ffi::Error::InvalidArgument("max_pool_grad: expected x and dx (B, H, W, C) and g (B, Ho, Wo, C) of one "
                                       "dtype, 0 <= padding < window, stride >= 1");
  if (Empty(d)) return ffi::Error::InvalidArgument("max_pool_grad: x must not be empty");
  if (d[1] * d[2] >= kMaxPositions) return ffi::Error::InvalidArgument("max_pool_grad: H * W must be below 2^24");
  return ForType(x.element_type(), "max_pool_grad", [&](auto t) {
    using T = decltype(t);
    MaxPoolGrad(In<T>(x), In<T>(g), Out<T>(dx), d[0], d[1], d[2], d[3], o[1], o[2], window, stride, padding);
  });
}

// ----------------------------------------------------------------------------- BatchNorm reductions
//
// Over the rows of x (N, C) per channel, reading bfloat16 or float32 once: XLA:CPU converted bfloat16
// activations into float32 copies before its reductions. Chunks of kStatRows rows x blocks of kLanes
// channels run in parallel; their partial results are merged in chunk order, so results do not
// depend on the thread count.
constexpr int64_t kStatRows = 256;

struct RowChunks {
  int64_t N, C, chunks, blocks;
  RowChunks(int64_t n, int64_t c) : N(n), C(c), chunks((n + kStatRows - 1) / kStatRows), blocks((c + kLanes - 1) / kLanes) {}
  int64_t tasks() const { return chunks * blocks; }
  int64_t n0(int64_t task) const { return (task / blocks) * kStatRows; }
  int64_t n1(int64_t task) const { return std::min(N, n0(task) + kStatRows); }
  int64_t c0(int64_t task) const { return (task % blocks) * kLanes; }
  int64_t width(int64_t task) const { return std::min(kLanes, C - c0(task)); }
};

// mean[c] and the biased variance var[c] of x[:, c], float32: each chunk's mean and sum of squared
// deviations from it (two passes over the chunk, which stays in cache), merged as Chan et al.
// Rows are summed in float32 runs of kRun (vectorised), each run's sums added into float64 totals:
// about as accurate as float64 throughout (and as XLA's tree sums), at float32 speed.
constexpr int64_t kRun = 4;

// total[k][q] = the sum over rows n in [n0, n1) of the K terms that add_row(n, run) adds into run[k][q]
// (q < width): float32 runs of kRun rows, each run added into the float64 total.
template <int K, typename AddRow>
void SumRowsInRuns(int64_t n0, int64_t n1, int64_t width, double (&total)[K][kLanes], AddRow add_row) {
  float run[K][kLanes];
  for (int k = 0; k < K; ++k)
    for (int64_t q = 0; q < width; ++q) total[k][q] = 0.0;
  for (int64_t start = n0; start < n1; start += kRun) {
    for (int k = 0; k < K; ++k)
      for (int64_t q = 0; q < width; ++q) run[k][q] = 0.f;
    for (int64_t n = start; n < std::min(n1, start + kRun); ++n) add_row(n, run);
    for (int k = 0; k < K; ++k)
      for (int64_t q = 0; q < width; ++q) total[k][q] += run[k][q];
  }
}

template <typename T>
void BatchStats(const T* x, float* mean, float* var, int64_t N, int64_t C) {
  const RowChunks r(N, C);
  std::vector<double> chunk_mean(r.chunks * C), chunk_m2(r.chunks * C);
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < r.tasks(); ++task) {
    const int64_t n0 = r.n0(task), n1 = r.n1(task), c0 = r.c0(task), width = r.width(task);
    double sum[1][kLanes], m2[1][kLanes];
    float centre[kLanes], shift[kLanes];
    // Sums of x - (the chunk's first row): terms of the data's spread, not of its mean, so that the
    // chunk means (merged below) stay exact when the mean is large against the spread.
    for (int64_t q = 0; q < width; ++q) shift[q] = ToFloat(x[n0 * C + c0 + q]);
    SumRowsInRuns(n0, n1, width, sum, [&](int64_t n, float (&run)[1][kLanes]) {
      const T* row = x + n * C + c0;
      for (int64_t q = 0; q < width; ++q) run[0][q] += ToFloat(row[q]) - shift[q];
    });
    const double rows = static_cast<double>(n1 - n0);
    for (int64_t q = 0; q < width; ++q) {  // the chunk's mean
      sum[0][q] = shift[q] + sum[0][q] / rows;
      centre[q] = static_cast<float>(sum[0][q]);
    }
    SumRowsInRuns(n0, n1, width, m2, [&](int64_t n, float (&run)[1][kLanes]) {
      const T* row = x + n * C + c0;
      for (int64_t q = 0; q < width; ++q) {
        const float d = ToFloat(row[q]) - centre[q];
        run[0][q] += d * d;
      }
    });
    const int64_t k = n0 / kStatRows;
    for (int64_t q = 0; q < width; ++q) {
      const double offset = sum[0][q] - centre[q];  // deviations were taken from the float32-rounded mean
      chunk_mean[k * C + c0 + q] = sum[0][q];
      chunk_m2[k * C + c0 + q] = std::max(0.0, m2[0][q] - rows * offset * offset);
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    double count = 0, m = 0, m2 = 0;
    for (int64_t k = 0; k < r.chunks; ++k) {
      const double rows = static_cast<double>(std::min(N, (k + 1) * kStatRows) - k * kStatRows);
      const double delta = chunk_mean[k * C + c] - m, total = count + rows;
      m += delta * rows / total;
      m2 += chunk_m2[k * C + c] + delta * delta * count * rows / total;
      count = total;
    }
    mean[c] = static_cast<float>(m);
    var[c] = static_cast<float>(m2 / static_cast<double>(N));
  }
}

// sum_g[c] = sum_n g[n, c] and sum_gc[c] = sum_n g[n, c] * (x[n, c] - mean[c]), float32.
template <typename T>
void BatchNormGradSums(const T* x, const T* g, const float* mean, float* sum_g, float* sum_gc, int64_t N, int64_t C) {
  const RowChunks r(N, C);
  std::vector<double> chunk_g(r.chunks * C), chunk_gc(r.chunks * C);
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < r.tasks(); ++task) {
    const int64_t n0 = r.n0(task), n1 = r.n1(task), c0 = r.c0(task), width = r.width(task);
    double sums[2][kLanes];  // of g, of g * (x - mean)
    float mu[kLanes];
    for (int64_t q = 0; q < width; ++q) mu[q] = mean[c0 + q];
    SumRowsInRuns(n0, n1, width, sums, [&](int64_t n, float (&run)[2][kLanes]) {
      const T *xr = x + n * C + c0, *gr = g + n * C + c0;
      for (int64_t q = 0; q < width; ++q) {
        const float gv = ToFloat(gr[q]);
        run[0][q] += gv;
        run[1][q] += gv * (ToFloat(xr[q]) - mu[q]);
      }
    });
    const int64_t k = n0 / kStatRows;
    for (int64_t q = 0; q < width; ++q) chunk_g[k * C + c0 + q] = sums[0][q], chunk_gc[k * C + c0 + q] = sums[1][q];
  }
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, b = 0;
    for (int64_t k = 0; k < r.chunks; ++k) a += chunk_g[k * C + c], b += chunk_gc[k * C + c];
    sum_g[c] = static_cast<float>(a);
    sum_gc[c] = static_cast<float>(b);
  }
}

ffi::Error BatchStatsImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> mean, ffi::Result<ffi::AnyBuffer> var) {
  auto d = x.dimensions();
  if (d.size() != 2 || !HasShape(mean->dimensions(), {d[1]}) || !HasShape(var->dimensions(), {d[1]}) ||
      mean->element_type() != ffi::DataType::F32 || var->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("batch_stats: expected x (N, C) and float32 outputs (C,)");
  if (Empty(d)) return ffi::Error::InvalidArgument("batch_stats: x must not be empty");
  return ForType(x.element_type(), "batch_stats", [&](auto t) {
    using T = decltype(t);
    BatchStats(In<T>(x), Out<float>(mean), Out<float>(var), d[0], d[1]);
  });
}

ffi::Error BatchNormGradSumsImpl(ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::AnyBuffer mean,
                                 ffi::Result<ffi::AnyBuffer> sum_g, ffi::Result<ffi::AnyBuffer> sum_gc) {
  auto d = x.dimensions();
  if (d.size() != 2 || !(g.dimensions() == d) || !HasShape(mean.dimensions(), {d[1]}) ||
      !HasShape(sum_g->dimensions(), {d[1]}) || !HasShape(sum_gc->dimensions(), {d[1]}) ||
      g.element_type() != x.element_type() || mean.element_type() != ffi::DataType::F32 ||
      sum_g->element_type() != ffi::DataType::F32 || sum_gc->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("batch_norm_grad_sums: expected x and g (N, C) of one dtype, float32 mean "
                                       "and outputs (C,)");
  if (Empty(d)) return ffi::Error::InvalidArgument("batch_norm_grad_sums: x must not be empty");
  return ForType(x.element_type(), "batch_norm_grad_sums", [&](auto t) {
    using T = decltype(t);
    BatchNormGradSums(In<T>(x), In<T>(g), In<float>(mean), Out<float>(sum_g), Out<float>(sum_gc), d[0], d[1]);
  });
}

}  // namespace

// Bindings by the number of buffer arguments and results; the pools take window, stride and padding.
#define ARGS_1 ffi::Ffi::Bind().Arg<ffi::AnyBuffer>()
#define ARGS_2 ARGS_1.Arg<ffi::AnyBuffer>()
#define ARGS_3 ARGS_2.Arg<ffi::AnyBuffer>()
#define RESULTS_1 .Ret<ffi::AnyBuffer>()
#define RESULTS_2 RESULTS_1.Ret<ffi::AnyBuffer>()
#define POOL_GEOMETRY .Attr<int64_t>("window").Attr<int64_t>("stride").Attr<int64_t>("padding")

XLA_FFI_DEFINE_HANDLER_SYMBOL(CbamMaxGrad, MaxGradImpl, ARGS_2 RESULTS_1);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CbamAvgMax, AvgMaxImpl, ARGS_1 RESULTS_2);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CbamAvgMaxGrad, AvgMaxGradImpl, ARGS_3 RESULTS_1);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CbamGateGrad, GateGradImpl, ARGS_3 RESULTS_2);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CbamBatchStats, BatchStatsImpl, ARGS_1 RESULTS_2);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CbamBatchNormGradSums, BatchNormGradSumsImpl, ARGS_3 RESULTS_2);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CbamMaxPool, MaxPoolImpl, ARGS_1 RESULTS_1 POOL_GEOMETRY);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CbamMaxPoolGrad, MaxPoolGradImpl, ARGS_2 RESULTS_1 POOL_GEOMETRY);

#define CONV_BINDING                                           \
  ffi::Ffi::Bind()                                             \
      .Arg<ffi::AnyBuffer>()                                   \
      .Arg<ffi::AnyBuffer>()                                   \
      .Ret<ffi::AnyBuffer>()                                   \
      .Attr<ffi::Span<const int64_t>>("strides")               \
      .Attr<ffi::Span<const int64_t>>("dilation")              \
      .Attr<ffi::Span<const int64_t>>("padding")

XLA_FFI_DEFINE_HANDLER_SYMBOL(CbamOnednnConvForward, ForwardImpl, CONV_BINDING);

// 1 if oneDNN has bfloat16 convolutions on this CPU (AVX-512 and newer), else 0: a small forward
// and backward-data primitive descriptor either exists or not.
extern "C" int CbamOnednnBf16Supported() {
  try {
    auto& engine = Engine();
    memory::dims src = {1, 16, 8, 8}, kernel = {16, 16, 3, 3}, one = {1, 1}, zero = {0, 0};
    memory::desc src_md(src, memory::data_type::bf16, tag::nhwc), dst_md(src, memory::data_type::bf16, tag::nhwc);
    memory::desc kernel_md(kernel, memory::data_type::bf16, tag::any);
    dnnl::convolution_forward::primitive_desc fwd(engine, dnnl::prop_kind::forward_training,
                                                  dnnl::algorithm::convolution_direct, src_md, kernel_md, dst_md,
                                                  one, zero, one, one);
    dnnl::convolution_backward_data::primitive_desc bwd(engine, dnnl::algorithm::convolution_direct, src_md,
                                                        kernel_md, dst_md, one, zero, one, one, fwd);
    return 1;
  } catch (...) {
    return 0;
  }
}
XLA_FFI_DEFINE_HANDLER_SYMBOL(CbamOnednnConvInputGrad, InputGradImpl, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CbamOnednnConvKernelGrad, KernelGradImpl, CONV_BINDING);

