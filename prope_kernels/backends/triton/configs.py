"""Tuning policy of the Triton attention kernels (attention.py), as data below them: config
tables, the autotuner's pruning (and the configs tests force, :data:`FORCED`), and the GQA split
of the backward. What acts on the kernels themselves (forcing a config, the configs chosen last)
is in tuning.py, above attention.py.

On a GPU the autotuner times the rows of the head_dim bucket's table (all of them by default; the
first only with PROPE_AUTOTUNE=0; exactly one under :func:`force_config`). Under the CPU
interpreter (TRITON_INTERPRET=1) each kernel has one small config.
"""

from __future__ import annotations

import torch
import triton

from ... import env
from .rope import rope_launch_raw

# (BLOCK_M, BLOCK_N, warps, stages) per head_dim bucket; the autotuner picks among those that fit.
# Chosen from an ahead-of-time sm_90 compile (Triton 3.6, aligned args: see
# tests/test_triton_gpu_compile.py --all): candidates that spill no or few registers, with wgmma.
FWD = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)],
    256: [(128, 64, 8, 2), (128, 32, 8, 2), (128, 32, 8, 3), (64, 64, 4, 2)],
    # d512 (Triton 3.6, sm_90, bf16, Q pre-rotated): 64x16 with 2 stages spills 144 B a thread,
    # 64x32 with 1 stage (the earlier first row) 896 B, 64x16 with 4 warps 1.6 KiB
    512: [(64, 16, 8, 2), (64, 32, 8, 2), (64, 32, 8, 1), (32, 32, 4, 1)],
}
# dkdv: BLOCK_N rows of k/v stationary (two fp32 (BLOCK_N, d) accumulators), BLOCK_M q rows
# streamed; dq: BLOCK_M rows of q stationary (one accumulator), BLOCK_N keys streamed. Separate
# tables: the stationary tile of each wants to be large, the streamed one small. At d=256 the
# dkdv accumulators alone take 128 registers a thread at BLOCK_N=64 with 8 warps: the streamed
# q block is kept at 16-32 rows and cp.async pipelining (stages >= 2) keeps loads out of registers.
DKDV = {
    64: [(64, 128, 8, 2), (32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3)],
    128: [(32, 128, 8, 3), (16, 128, 8, 3), (32, 128, 8, 2), (16, 64, 4, 3), (64, 128, 8, 2)],
    256: [(16, 64, 8, 2), (32, 64, 8, 2), (32, 64, 8, 3), (16, 32, 4, 2), (32, 32, 4, 2)],
    512: [(16, 32, 8, 2), (16, 16, 8, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
}
DQ = {
    64: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 3), (128, 128, 8, 2)],
    128: [(128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
    256: [(128, 32, 8, 2), (64, 32, 8, 2), (64, 32, 8, 3), (128, 16, 8, 2), (64, 16, 8, 2)],
    512: [(64, 16, 8, 2), (32, 16, 4, 1), (16, 16, 4, 1)],
}
TABLES = {"fwd": FWD, "dkdv": DKDV, "dq": DQ}
# the one config of each kernel under the CPU interpreter
INTERPRETER = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}
# retune per (shape class, power-of-two sequence bucket); dkdv also per GQA split mode
AUTOTUNE_KEY = ["HEAD_DIM", "GROUP", "CAUSAL", "ROTATE", "WINDOW", "SOFTCAP", "seq_bucket"]
_KEYS = {"fwd": AUTOTUNE_KEY, "dkdv": AUTOTUNE_KEY + ["SPLIT", "ATOMIC"], "dq": AUTOTUNE_KEY}


def bucket(d: int) -> int:
    return 64 if d <= 64 else 128 if d <= 128 else 256 if d <= 256 else 512


def seq_bucket(max_seqlen: int) -> int:
    """Autotuning key: retune per power-of-two bucket, not per distinct varlen max."""
    return triton.next_power_of_2(max(int(max_seqlen), 16))


def rows(table) -> list:
    """Every distinct row of a table, in order."""
    return list(dict.fromkeys(row for rs in table.values() for row in rs))


def cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def rotate_q_into_out(nargs):
    # pre-hook of the Q_ON_LOAD=0 forward configs: O <- p-RoPE(Q); the kernel then reads Q' from O
    if nargs["N_ROT"] > 0:
        rope_launch_raw(nargs["Q"], nargs["O"], nargs["POS"], nargs["PAIR_A"], nargs["PAIR_B"],
                        nargs["PAIR_F"], nargs["IDS"], nargs["N_ROT"], False)


def fwd_cfg(bm, bn, warps, stages, q_on_load):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "Q_ON_LOAD": q_on_load}, num_warps=warps,
                         num_stages=stages, pre_hook=None if q_on_load else rotate_q_into_out)


def candidates(kernel: str) -> list:
    """The configs the autotuner is given for ``kernel`` (before pruning)."""
    if kernel == "fwd":
        if env.interpreting():
            # one config; tests switch Q_ON_LOAD through set_interpreter_q_on_load()
            return [fwd_cfg(*INTERPRETER["fwd"], 1)]
        return [fwd_cfg(*row, q) for row in rows(FWD) for q in (1, 0)]
    if env.interpreting():
        return [cfg(*INTERPRETER[kernel])]
    return [cfg(*row) for row in rows(TABLES[kernel])]


# kernel name -> row forced by force_config (tests that run every tuned config)
FORCED = {}


def prune(kernel: str):
    """The autotuner's early_config_prune for ``kernel``: keep the rows of the head_dim bucket
    (all, the first with PROPE_AUTOTUNE=0, or the forced one); drop the pre-rotated Q mode when
    nothing rotates."""
    table = TABLES[kernel]

    def prune_configs(configs, named_args, **kwargs):
        if len(configs) == 1:
            return configs
        args = {**named_args, **kwargs}
        table_rows = table[bucket(args["HEAD_DIM"])]
        forced = FORCED.get(kernel)
        untuned = not env.autotune()
        keep = [forced[:4]] if forced is not None else table_rows[:1] if untuned else table_rows
        kept = [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep
                and (c.kwargs.get("Q_ON_LOAD", 1) or args.get("N_ROT", 0) > 0)]
        if forced is not None:
            kept = [c for c in kept if len(forced) == 4 or c.kwargs["Q_ON_LOAD"] == forced[4]]
            if len(kept) != 1:
                raise ValueError(f"force_config({kernel!r}, {forced}): not a config of head_dim "
                                 f"{args['HEAD_DIM']} (its rows: {table_rows})")
        elif untuned:
            kept = kept[-1:]  # forward: Q_ON_LOAD=0 when rotating (fewer registers), else 1
        return kept or configs
    return prune_configs


def autotune_args(kernel: str) -> dict:
    """Keyword arguments of ``triton.autotune`` for ``kernel`` ("fwd", "dkdv" or "dq")."""
    return dict(configs=candidates(kernel), key=_KEYS[kernel],
                prune_configs_by={"early_config_prune": prune(kernel)})


def dkdv_max_block_n(head_dim: int) -> int:
    """The largest stationary key block the dkdv autotuner may pick (sizes the GQA split)."""
    if env.interpreting():
        return INTERPRETER["dkdv"][1]
    return max(row[1] for row in DKDV[bucket(head_dim)])


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # interpreter: small, so that the CPU tests exercise SPLIT > 1 too


def kv_split(group: int, kv_programs: int, device) -> int:
    """Split a kv head's query-head group over programs when there are too few kv programs to
    fill the GPU (MQA/GQA with few kv heads): the smallest divisor of the group giving about
    four programs per SM. kv_programs: (sequence, kv head, key block) programs at the largest
    tuned key block. PROPE_KV_SPLIT overrides it (tests)."""
    forced = env.kv_split()
    if forced:
        if group % forced:
            raise ValueError(f"PROPE_KV_SPLIT={forced} must divide the GQA group {group}")
        return forced
    want = 4 * _num_sms(device)
    for split in range(1, group + 1):
        if group % split == 0 and kv_programs * split >= want:
            return split
    return group
