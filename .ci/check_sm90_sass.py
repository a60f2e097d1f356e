"""CI guard (no GPU needed): the SM90 kernels must compile to the Hopper instructions they were
written for, so that a change which silently falls back to a slower path fails CI.

For every kernel function in the sm_90a SASS of the given object files (cuobjdump --dump-sass):
  HGMMA       warpgroup MMA (wgmma); an SM80-style fallback shows HMMA only
  UTMALDG     TMA tensor loads (cp.async.bulk.tensor)
  USETMAXREG  register reallocation between producer and consumer warpgroups (setmaxnreg)
  no STL/LDL  no local memory at all: neither register spills nor local arrays
and, in the fused backward kernel (attn_bwd_fused_sm90_kernel), also
  REDG ... F32x4  dQ summed with vector (float4) reduction atomics, not scalar ones
  UBLKCP      the bulk copies that stage lse and delta with Q and dO
At least one kernel of each SM90 kind an object is named for: attn_sm90_fwd_* objects the
forward, attn_sm90_bwd_* objects the fused backward and the split backward's dK/dV kernel
(attn_bwd_sm90_kernel) and dQ kernel (attn_bwd_dq_sm90_kernel); any other object all four.
Exit status 1 with the reasons otherwise.

Usage: python .ci/check_sm90_sass.py CUOBJDUMP OBJECT.o [OBJECT.o ...]
"""

from __future__ import annotations

import re
import subprocess
import sys

REQUIRED = ("HGMMA", "UTMALDG", "USETMAXREG")
KINDS = ("attn_fwd_sm90_kernel", "attn_bwd_fused_sm90_kernel", "attn_bwd_sm90_kernel",
         "attn_bwd_dq_sm90_kernel")
FORBIDDEN = ("STL", "LDL")
# kind -> (what the check calls it, a regex over its instruction lines)
REQUIRED_BY_KIND = {"attn_bwd_fused_sm90_kernel": (("REDG.F32x4", r"\bREDG\.[A-Z0-9.]*F32x4"),
                                                   ("UBLKCP", r"\bUBLKCP\b"))}


def functions(sass: str) -> dict[str, list[str]]:
    """{mangled kernel name: its SASS instruction lines} for the sm_90a code of one object."""
    out: dict[str, list[str]] = {}
    arch = None
    name = None
    for line in sass.splitlines():
        m = re.search(r"arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            name = None
            continue
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1) if arch == "sm_90a" else None
            if name:
                out[name] = []
            continue
        if name and re.search(r"/\*[0-9a-f]{4,}\*/", line):
            out[name].append(line)
    return out


def opcodes(lines: list[str]) -> set[str]:
    ops = set()
    for line in lines:
        # "/*0430*/   @!UP0 SYNCS.EXCH.64 URZ, ..." -> "SYNCS"
        m = re.search(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops.add(m.group(1))
    return ops


def count(lines: list[str], op: str) -> int:
    pat = re.compile(r"\b" + op + r"\b")
    return sum(1 for line in lines if pat.search(line))


def expected_kinds(obj: str) -> tuple[str, ...]:
    """The kernel kinds an object must hold, from its file name."""
    name = obj.rsplit("/", 1)[-1]
    if name.startswith("attn_sm90_fwd_"):
        return KINDS[:1]
    if name.startswith("attn_sm90_bwd_"):
        return KINDS[1:]
    return KINDS


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__)
        return 2
    cuobjdump, objects = argv[1], argv[2:]
    failures = []
    for obj in objects:
        sass = subprocess.run([cuobjdump, "--dump-sass", obj], capture_output=True, text=True,
                              check=True).stdout
        kernels = {k: v for k, v in functions(sass).items() if any(kind in k for kind in KINDS)}
        for kind in expected_kinds(obj):
            if not any(kind in k for k in kernels):
                failures.append(f"{obj}: no sm_90a {kind} in its SASS (built without the 9.0a "
                                "target?)")
        for name, lines in sorted(kernels.items()):
            ops = opcodes(lines)
            missing = [op for op in REQUIRED if op not in ops]
            for kind, extra in REQUIRED_BY_KIND.items():
                if kind in name:
                    missing += [what for what, pat in extra
                                if not any(re.search(pat, line) for line in lines)]
            local = [op for op in FORBIDDEN if op in ops]
            status = "ok"
            if missing or local:
                status = (f"missing {','.join(missing)} " if missing else "") + \
                         (f"local memory {','.join(local)}" if local else "")
                failures.append(f"{obj}: {name}: {status}")
            counts = " ".join(f"{op}={count(lines, op)}" for op in REQUIRED + FORBIDDEN)
            print(f"{obj.rsplit('/', 1)[-1]}: {name}: {counts} {status}")
    if failures:
        print("SM90 SASS guard FAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"SM90 SASS guard: {len(objects)} objects ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
