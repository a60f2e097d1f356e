// Scalar device helpers with no CuTe dependency: rotation angles, fast exp2, float conversion.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace prope {

// cos/sin of pos * freq. The angle is formed in float64 and reduced to [-pi, pi] (two-term 2*pi,
// exact to ~1e-10 rad at position 1e6); only then fp32 sincos (precise, not __sincosf).
__device__ __forceinline__ void rot_cos_sin(int64_t pos, double freq, float& c, float& s) {
  const double a = static_cast<double>(pos) * freq;
  const double k = rint(a * 0.15915494309189535);  // a / (2*pi)
  double r = fma(-k, 6.283185307179586, a);         // 2*pi, high part
  r = fma(-k, 2.4492935982947064e-16, r);           // 2*pi, low part
  sincosf(static_cast<float>(r), &s, &c);
}

// The same angle, evaluated as sin/cos(pi * x) with x = (angle reduced to one turn) / pi in
// [-1, 1]: sincospif needs no Payne-Hanek reduction, so no local-memory array (the SM90 kernels
// are guarded in CI against any local-memory instruction). Same accuracy (~1 ulp fp32).
__device__ __forceinline__ void rot_cos_sin_pi(int64_t pos, double freq, float& c, float& s) {
  const double turns = static_cast<double>(pos) * freq * 0.15915494309189535;  // a / (2*pi)
  const double f = turns - rint(turns);                                          // [-0.5, 0.5]
  sincospif(static_cast<float>(2.0 * f), &s, &c);
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <typename T> __device__ __forceinline__ float to_f(T x) { return static_cast<float>(x); }

}  // namespace prope
