// SM90 forward, one (dtype, head_dim) instantiation: causal x rotate x mainloop (basic, overlap)
// = 8 kernels. Forward and backward live in separate files so that a parallel build compiles
// them side by side. Compiled only in builds with an sm_90a target.
#include "prope_attn/fwd_sm90.h"

template cudaError_t prope::run_attn_fwd_sm90<false, 128>(const prope::FwdParams&, cudaStream_t);
template int prope::attn_fwd_sm90_smem_bytes<false, 128>();
