"""One zlib for the whole process. libpaddle.so (2.6) exports its own zlib symbols; with a
Python whose zlib module is a shared library, importing paddleslim or paddleseg after paddle
then crashes in inflateReset2. Loading the system libz globally first makes every module
bind to it.

`segslim` does this on import (so its modules may import paddle and paddleseg in any
order); install() (run by `make install`) writes a .pth file into the
environment's site-packages that does it at every interpreter start, so processes that
never import segslim (PaddleSeg's own tools, `python -c "import paddle, paddleseg"`) are
safe too."""
import ctypes
import ctypes.util
import os
import sysconfig
from typing import Optional

PTH_NAME = 'segslim-zlib.pth'


def libz_path() -> Optional[str]:
    """The system libz: its usual place on Linux, else where the linker finds it."""
    for folder in ('/lib/x86_64-linux-gnu', '/usr/lib/x86_64-linux-gnu', '/lib64', '/usr/lib64',
                   '/lib/aarch64-linux-gnu', '/usr/lib/aarch64-linux-gnu'):
        path = os.path.join(folder, 'libz.so.1')
        if os.path.exists(path):
            return path
    return ctypes.util.find_library('z')


def preload(path: Optional[str] = None) -> bool:
    """Loads libz with RTLD_GLOBAL; returns whether it was found."""
    path = path or libz_path()
    if not path:
        return False
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return True


def pth_line(path: str) -> str:
    """The .pth line (site runs lines that start with `import`) that preloads `path`."""
    code = f'try:\n ctypes.CDLL({path!r}, mode=ctypes.RTLD_GLOBAL)\nexcept OSError:\n pass'
    return f'import ctypes; exec({code!r})\n'


def install(site_dir: Optional[str] = None) -> Optional[str]:
    """Writes the .pth into `site_dir` (default: this environment's purelib); returns its
    path, or None when there is no system libz to bind."""
    path = libz_path()
    if not path:
        return None
    target = os.path.join(site_dir or sysconfig.get_paths()['purelib'], PTH_NAME)
    with open(target, 'w') as f:
        f.write(pth_line(path))
    return target

