// SM90 forward (causal x rotate: 4 kernels) and backward (dK/dV, causal x atomic-dQ: 4 kernels;
// dQ, causal: 2 kernels), one
// (dtype, head_dim) instantiation per file.
// Compiled only in builds with an sm_90a target; the kernel bodies are empty for other targets.
#include "prope_attn/bwd_sm90.h"
#include "prope_attn/fwd_sm90.h"

template cudaError_t prope::run_attn_fwd_sm90<false, 256>(const prope::FwdParams&, cudaStream_t);
template int prope::attn_fwd_sm90_smem_bytes<false, 256>();
template cudaError_t prope::run_attn_bwd_sm90<false, 256>(const prope::BwdParams&, cudaStream_t);
template int prope::attn_bwd_sm90_smem_bytes<false, 256>();
