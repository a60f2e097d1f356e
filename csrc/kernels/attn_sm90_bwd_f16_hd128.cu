// SM90 backward, one (dtype, head_dim) instantiation: the dK/dV kernel (causal x split/atomic-dQ:
// 4 kernels) and the dQ kernel of the split backward (causal: 2 kernels). Compiled only in builds
// with an sm_90a target.
#include "prope_attn/bwd_sm90.h"

template cudaError_t prope::run_attn_bwd_sm90<false, 128>(const prope::BwdParams&, cudaStream_t);
template int prope::attn_bwd_sm90_smem_bytes<false, 128>();
