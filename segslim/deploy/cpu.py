"""What the CPU offers for INT8/bf16 inference."""
import os
import platform
from typing import Any, Dict, Set

from segslim.machine import usable_cores


def cpu_features(cpuinfo: str = '/proc/cpuinfo', ask_paddle: bool = True) -> Dict[str, Any]:
    """{'model', 'isa', 'vnni', 'bf16', 'amx', 'cores', 'simd_floats'}; isa names the best
    INT8 path: AMX > AVX-512 VNNI > AVX-VNNI > AVX-512 > AVX2 > other; simd_floats is how
    many float32 values one vector register holds (16 with AVX-512, else 8), the channel
    block of the engines' blocked layouts; cores are those this process may run on (its CPU
    affinity: a container or `taskset` gives fewer than the machine has).

    `vnni` and `bf16` come from paddle (what its oneDNN kernels detect) when ask_paddle;
    /proc/cpuinfo is read for what paddle does not expose: the model name, AMX and the ISA
    name a report states."""
    flags: Set[str] = set()
    model = platform.processor() or platform.machine()
    if os.path.exists(cpuinfo):
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith('flags') and not flags:
                    flags = set(line.split(':', 1)[1].split())
                elif line.startswith('model name'):
                    model = line.split(':', 1)[1].strip()
    amx = 'amx_int8' in flags
    vnni = 'avx512_vnni' in flags or 'avx_vnni' in flags or amx
    bf16 = 'avx512_bf16' in flags or 'amx_bf16' in flags
    if ask_paddle:
        from segslim._paddle import paddle
        core = paddle.base.core
        vnni = bool(core.supports_vnni()) or amx
        bf16 = bool(core.supports_bfloat16())
    if amx:
        isa = 'AMX'
    elif 'avx512_vnni' in flags:
        isa = 'AVX-512 VNNI'
    elif 'avx_vnni' in flags:
        isa = 'AVX-VNNI'
    elif 'avx512f' in flags:
        isa = 'AVX-512'
    elif 'avx2' in flags:
        isa = 'AVX2'
    else:
        isa = platform.machine()
    return {'model': model, 'isa': isa, 'vnni': vnni, 'bf16': bf16, 'amx': amx,
            'cores': usable_cores(), 'simd_floats': 16 if 'avx512f' in flags else 8}
