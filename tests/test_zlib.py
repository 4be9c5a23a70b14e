"""One zlib for every process of the environment: importing paddle and then paddleseg
crashes in inflateReset2 unless the system libz was loaded globally first."""
import os
import subprocess
import sys
import sysconfig

from segslim import zlib_hook
from segslim.compat import installed_paddle_version, paddle_major


def run_python(code, **env):
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, **env))


def bare_import(hook_dir=None):
    """`import paddle, paddleseg` in this interpreter started without site (-S), so no .pth
    of this environment runs; with `hook_dir`, site processes the .pth written there."""
    code = 'import site, sys; '
    if hook_dir:
        code += f'site.addsitedir({hook_dir!r}); '
    code += ('site.getusersitepackages(); sys.path.append({!r}); import paddle, paddleseg; '
             'print("segslim" in sys.modules)'.format(sysconfig.get_paths()['purelib']))
    return subprocess.run([sys.executable, '-S', '-c', code], capture_output=True, text=True,
                          timeout=300)


def test_pth_hook_binds_libz_before_anything_is_imported(tmp_path):
    path = zlib_hook.install(str(tmp_path))
    assert path and os.path.basename(path) == zlib_hook.PTH_NAME
    unhooked = bare_import()
    hooked = bare_import(str(tmp_path))
    if paddle_major(installed_paddle_version() or '2') < 3:  # Paddle 3 links zlib apart
        assert unhooked.returncode != 0  # the crash this hook exists for
    assert hooked.returncode == 0, hooked.stderr[-2000:]
    assert hooked.stdout.strip() == 'False'  # nothing of segslim was imported


def test_environment_imports_paddle_then_paddleseg_without_segslim():
    # make install writes the hook into this environment's site-packages
    proc = run_python('import sys; import paddle, paddleseg; print("segslim" in sys.modules)')
    assert proc.returncode == 0, ('this environment crashes on `import paddle, paddleseg`; run '
                                  'make install (it binds one zlib at start-up)',
                                  proc.stderr[-2000:])
    assert proc.stdout.strip() == 'False'
