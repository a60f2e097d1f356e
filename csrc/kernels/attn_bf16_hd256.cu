// One (dtype, head_dim) instantiation per file so builds run in parallel:
// forward (causal x rotate: 4 kernels) and backward (causal: 2 kernels).
#include "prope_attn/bwd_kernel.h"
#include "prope_attn/fwd_kernel.h"

template cudaError_t prope::run_attn_fwd<true, 256>(const prope::FwdParams&, cudaStream_t);
template cudaError_t prope::run_attn_bwd<true, 256>(const prope::BwdParams&, cudaStream_t);
template int prope::attn_fwd_smem_bytes<true, 256>();
template int prope::attn_bwd_smem_bytes<true, 256>();
