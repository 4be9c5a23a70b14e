"""What the CPU offers for INT8/bf16 inference, read from /proc/cpuinfo."""
import os
import platform
from typing import Any, Dict


def cpu_features(cpuinfo: str = '/proc/cpuinfo') -> Dict[str, Any]:
    """{'model', 'isa', 'vnni', 'bf16', 'amx', 'cores'}; isa names the best INT8 path:
    AMX > AVX-512 VNNI > AVX-VNNI > AVX-512 > AVX2 > other."""
    flags, model = set(), platform.processor() or platform.machine()
    if os.path.exists(cpuinfo):
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith('flags') and not flags:
                    flags = set(line.split(':', 1)[1].split())
                elif line.startswith('model name'):
                    model = line.split(':', 1)[1].strip()
    amx = 'amx_int8' in flags
    vnni = 'avx512_vnni' in flags or 'avx_vnni' in flags
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
    return {'model': model, 'isa': isa, 'vnni': vnni or amx,
            'bf16': 'avx512_bf16' in flags or 'amx_bf16' in flags, 'amx': amx,
            'cores': os.cpu_count()}
