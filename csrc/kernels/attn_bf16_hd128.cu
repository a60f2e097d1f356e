// One (dtype, head_dim) instantiation: forward (causal x rotate) and backward (causal).
#include "prope_attn/fwd_kernel.h"
template cudaError_t prope::run_attn_fwd<true, 128>(const prope::FwdParams&, cudaStream_t);
