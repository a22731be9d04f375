// Float attention in one pass: out[b,h,i,:] = softmax_j(scale * q[b,h,i,:]·k[b,h,j,:] + mask[b,h,i,j]) · v[b,h,j,:]
// for float32 [B, H, L, D] views whose last dimension is contiguous (any other strides: the
// [B, S, H, D] -> [B, H, S, D] transposes of a user's attention read in place). The scores of a few
// query rows live in a row buffer (never a [L, L] tensor), next to K^T packed once per task.
//
// Not bit-identical to torch's matmul / softmax / matmul (another summation order, exp8's
// polynomial): within float32 rounding of it (tests/kernels/test_attention_native.py). A row whose
// scores hold a NaN or whose maximum is not finite (every key masked with -inf, an infinite input)
// comes out NaN, as torch's softmax makes it. Each output row is computed by one thread in a fixed
// order: the result does not depend on the thread count.
#include <torch/extension.h>

#include "activation.h"
#include "simd.h"

#include <cmath>
#include <limits>
#include <vector>

namespace quanta_native {
namespace {

constexpr int64_t kRows = 6;     // query rows per tile
constexpr int64_t kKeys = 16;    // keys per score tile (two 8-lane vectors)
constexpr int64_t kChunk = 48;   // query rows per parallel task

struct View {
  const float* p;
  int64_t sb, sh, sl;  // element strides of batch, head and row (the last dimension is contiguous)
  const float* row(int64_t b, int64_t h, int64_t l) const { return p + b * sb + h * sh + l * sl; }
};

// kt[d * lkp + j] = k[j][d] (zeros for lk <= j < lkp); 8 x 8 blocks transposed in registers
void pack_kt(const View& k, int64_t b, int64_t h, int64_t lk, int64_t lkp, int64_t d, float* kt) {
  int64_t j = 0;
#if defined(QUANTA_EXP8)
  for (; j + 8 <= lk; j += 8) {
    int64_t e = 0;
    for (; e + 8 <= d; e += 8) {
      __m256 r[8], t[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(k.row(b, h, j + i) + e);
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
      }
      // r[0..3]: columns e+0, e+1, e+2, e+3 of rows j..j+3 (low half) and of rows j..j+3 again (high
      // half: columns e+4..e+7); r[4..7] the same for rows j+4..j+7
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(kt + (e + i) * lkp + j, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(kt + (e + i + 4) * lkp + j, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
      }
    }
    for (; e < d; ++e)
      for (int i = 0; i < 8; ++i) kt[e * lkp + j + i] = k.row(b, h, j + i)[e];
  }
#endif
  for (; j < lkp; ++j) {
    const float* kr = j < lk ? k.row(b, h, j) : nullptr;
    for (int64_t e = 0; e < d; ++e) kt[e * lkp + j] = kr ? kr[e] : 0.f;
  }
}

// s[r * lkp + j] = scale (q_r · k_j) + mask_r[j] for the R rows at q0 (row stride qs), j < lk; -inf for
// lk <= j < lkp (no weight in the softmax)
template <int R>
void scores(const float* q0, int64_t qs, const float* kt, int64_t lk, int64_t lkp, int64_t d, float scale,
            const float* const* mask, float* s) {
#if defined(QUANTA_EXP8)
  const __m256 sc = _mm256_set1_ps(scale);
  for (int64_t j = 0; j < lkp; j += kKeys) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t e = 0; e < d; ++e) {
      __m256 k0 = _mm256_loadu_ps(kt + e * lkp + j), k1 = _mm256_loadu_ps(kt + e * lkp + j + 8);
      asm("" : "+x"(k0), "+x"(k1));  // in registers: folded into each row's FMA they would be loaded R times
      for (int r = 0; r < R; ++r) {
        const __m256 qv = _mm256_broadcast_ss(q0 + r * qs + e);
        acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      __m256 s0 = _mm256_mul_ps(acc[r][0], sc), s1 = _mm256_mul_ps(acc[r][1], sc);
      if (mask[r] && j + kKeys <= lk) {
        s0 = _mm256_add_ps(s0, _mm256_loadu_ps(mask[r] + j));
        s1 = _mm256_add_ps(s1, _mm256_loadu_ps(mask[r] + j + 8));
      }
      _mm256_storeu_ps(s + r * lkp + j, s0);
      _mm256_storeu_ps(s + r * lkp + j + 8, s1);
    }
  }
  const int64_t tail = lk / kKeys * kKeys;  // the last, partial block: its mask and padding one by one
#else
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < lk; ++j) {
      float a = 0.f;
      for (int64_t e = 0; e < d; ++e) a += q0[r * qs + e] * kt[e * lkp + j];
      s[r * lkp + j] = a * scale;
    }
  const int64_t tail = 0;
#endif
  for (int r = 0; r < R; ++r) {
    float* row = s + r * lkp;
    if (mask[r])
      for (int64_t j = tail; j < lk; ++j) row[j] += mask[r][j];
    for (int64_t j = lk; j < lkp; ++j) row[j] = -std::numeric_limits<float>::infinity();
  }
}

// One row of scores (padded with -inf to lkp): s[j] = e^(s[j] - max), j < lk; returns 1 / sum, or
// NaN where torch's softmax gives NaN (a NaN score, a maximum that is not finite).
float softmax_row(float* s, int64_t lk, int64_t lkp) {
  float mx = -std::numeric_limits<float>::infinity();
  bool nan = false;
  int64_t j = 0;
#if defined(QUANTA_EXP8)
  __m256 vmx = _mm256_set1_ps(mx), vnan = _mm256_setzero_ps();
  for (; j < lkp; j += 8) {
    const __m256 x = _mm256_loadu_ps(s + j);
    vmx = _mm256_max_ps(vmx, x);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmx);
  for (float l : lanes) mx = l > mx ? l : mx;
  nan = _mm256_movemask_ps(vnan) != 0;
#endif
  for (; j < lk; ++j) {
    nan |= s[j] != s[j];
    mx = s[j] > mx ? s[j] : mx;
  }
  if (nan || !std::isfinite(mx)) return std::numeric_limits<float>::quiet_NaN();
  float sum = 0.f;
  j = 0;
#if defined(QUANTA_EXP8)
  __m256 vs = _mm256_setzero_ps();
  const __m256 vm = _mm256_set1_ps(mx);
  for (; j + 8 <= lk; j += 8) {
    const __m256 e = act::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
    _mm256_storeu_ps(s + j, e);
    vs = _mm256_add_ps(vs, e);
  }
  _mm256_store_ps(lanes, vs);
  for (float l : lanes) sum += l;
#endif
  for (; j < lk; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  return 1.f / sum;
}

// out_r[c] = inv_r * sum_j p_r[j] v_j[c] for the R rows of p (row stride lkp)
template <int R>
void weighted_values(const float* p, int64_t lkp, const View& v, int64_t b, int64_t h, int64_t lk, int64_t dv,
                     const float* inv, float* out, int64_t os) {
  int64_t c = 0;
#if defined(QUANTA_EXP8)
  for (; c + 16 <= dv; c += 16) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < lk; ++j) {
      const float* vr = v.row(b, h, j) + c;
      const __m256 v0 = _mm256_loadu_ps(vr), v1 = _mm256_loadu_ps(vr + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 pv = _mm256_broadcast_ss(p + r * lkp + j);
        acc[r][0] = _mm256_fmadd_ps(pv, v0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(pv, v1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 iv = _mm256_set1_ps(inv[r]);
      _mm256_storeu_ps(out + r * os + c, _mm256_mul_ps(acc[r][0], iv));
      _mm256_storeu_ps(out + r * os + c + 8, _mm256_mul_ps(acc[r][1], iv));
    }
  }
  for (; c + 8 <= dv; c += 8) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < lk; ++j) {
      const __m256 v0 = _mm256_loadu_ps(v.row(b, h, j) + c);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + r * lkp + j), v0, acc[r]);
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * os + c, _mm256_mul_ps(acc[r], _mm256_set1_ps(inv[r])));
  }
#endif
  for (; c < dv; ++c)
    for (int r = 0; r < R; ++r) {
      float a = 0.f;
      for (int64_t j = 0; j < lk; ++j) a += p[r * lkp + j] * v.row(b, h, j)[c];
      out[r * os + c] = a * inv[r];
    }
}

template <int R>
void tile(const View& q, const View& v, const float* mask0, int64_t msl, int64_t b, int64_t h, int64_t i,
          const float* kt, int64_t lk, int64_t lkp, int64_t d, int64_t dv, float scale, float* s, float* out,
          int64_t os) {
  const float* mask[R];
  for (int r = 0; r < R; ++r) mask[r] = mask0 ? mask0 + (i + r) * msl : nullptr;
  scores<R>(q.row(b, h, i), q.sl, kt, lk, lkp, d, scale, mask, s);
  float inv[R];
  for (int r = 0; r < R; ++r) inv[r] = softmax_row(s + r * lkp, lk, lkp);
  weighted_values<R>(s, lkp, v, b, h, lk, dv, inv, out, os);
  for (int r = 0; r < R; ++r)  // NaN rows: NaN times anything is NaN, except where a product was never formed
    if (inv[r] != inv[r])
      for (int64_t c = 0; c < dv; ++c) out[r * os + c] = std::numeric_limits<float>::quiet_NaN();
}

}  // namespace

at::Tensor attention_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& mask, double scale) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->device().is_cpu(),
                "attention: q, k, v must be 4-d float32 CPU tensors");
    TORCH_CHECK(t->stride(3) == 1 || t->size(3) == 1, "attention: the last dimension must be contiguous");
  }
  const int64_t B = q.size(0), H = q.size(1), lq = q.size(2), d = q.size(3), lk = k.size(2), dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == d && v.size(0) == B && v.size(1) == H &&
                  v.size(2) == lk,
              "attention: q [B, H, Lq, D], k [B, H, Lk, D] and v [B, H, Lk, Dv] do not match");
  at::Tensor out = at::empty({B, H, lq, dv}, q.options());
  const float* mp = nullptr;
  int64_t mb = 0, mh = 0, ml = 0;
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.dim() == 4 && m.scalar_type() == at::kFloat && m.size(0) == B && m.size(1) == H &&
                    m.size(2) == lq && m.size(3) == lk && (m.stride(3) == 1 || lk == 1),
                "attention: the mask must be a float32 [B, H, Lq, Lk] view with contiguous last dimension");
    mp = m.data_ptr<float>();
    mb = m.stride(0), mh = m.stride(1), ml = m.stride(2);
  }
  if (out.numel() == 0) return out;
  if (lk == 0) return out.zero_();  // (torch: an empty softmax times no values sums to 0)
  const View qv{q.data_ptr<float>(), q.stride(0), q.stride(1), q.stride(2)};
  const View kv{k.data_ptr<float>(), k.stride(0), k.stride(1), k.stride(2)};
  const View vv{v.data_ptr<float>(), v.stride(0), v.stride(1), v.stride(2)};
  float* op = out.data_ptr<float>();
  const int64_t lkp = (lk + kKeys - 1) / kKeys * kKeys, chunks = (lq + kChunk - 1) / kChunk;
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(static_cast<size_t>(d * lkp)), s(static_cast<size_t>(kRows * lkp));
    int64_t packed = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / chunks, b = bh / H, h = bh % H;
      if (bh != packed) pack_kt(kv, b, h, lk, lkp, d, kt.data()), packed = bh;
      const float* m0 = mp ? mp + b * mb + h * mh : nullptr;
      const int64_t i1 = std::min(lq, (task % chunks + 1) * kChunk);
      for (int64_t i = (task % chunks) * kChunk; i < i1; i += kRows) {
        float* o = op + (bh * lq + i) * dv;
        switch (std::min(kRows, i1 - i)) {
          case 6: tile<6>(qv, vv, m0, ml, b, h, i, kt.data(), lk, lkp, d, dv, sc, s.data(), o, dv); break;
          case 5: tile<5>(qv, vv, m0, ml, b, h, i, kt.data(), lk, lkp, d, dv, sc, s.data(), o, dv); break;
          case 4: tile<4>(qv, vv, m0, ml, b, h, i, kt.data(), lk, lkp, d, dv, sc, s.data(), o, dv); break;
          case 3: tile<3>(qv, vv, m0, ml, b, h, i, kt.data(), lk, lkp, d, dv, sc, s.data(), o, dv); break;
          case 2: tile<2>(qv, vv, m0, ml, b, h, i, kt.data(), lk, lkp, d, dv, sc, s.data(), o, dv); break;
          default: tile<1>(qv, vv, m0, ml, b, h, i, kt.data(), lk, lkp, d, dv, sc, s.data(), o, dv); break;
        }
      }
    }
  });
  return out;
}

}  // namespace quanta_native
