"""Whether the packages `make install` installs exist as wheels for another Python, checked
with pip's resolver and no interpreter of that version: the PADDLE pin, requirements.txt,
requirements-dev.txt, setup.py's extras (openvino, onnx), paddleslim and paddleseg (without
their deps, as make install puts them in). Environment markers are evaluated for the target
Python, not this one. Exit 0 when everything resolves to wheels; else one line per package that
does not. Without --paddle, the paddle `make install` picks for that Python.

    python tools/wheels_check.py --python_version 3.13 [--paddle paddlepaddle==2.6.2]
    python tools/wheels_check.py --default_paddle   # the Makefile's PADDLE for this Python
"""
import argparse
import ast
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_DEPS = ['paddleslim==2.6.0', 'paddleseg==2.8.0']  # installed with --no-deps by make install
# paddlepaddle 2.6.2 has wheels up to Python 3.12; 3.13 and later get the Paddle 3.2 stack
PADDLE_2 = 'paddlepaddle==2.6.2'
PADDLE_3 = 'paddlepaddle==3.2.2'
LINUX_X86_64 = ['manylinux_2_28_x86_64', 'manylinux_2_17_x86_64', 'manylinux2014_x86_64',
                'manylinux2010_x86_64', 'manylinux1_x86_64', 'linux_x86_64']


def _requirement_lines(path):
    lines = []
    with open(path) as f:
        for line in f:
            line = line.split('#', 1)[0].strip()
            if line and not line.startswith('-'):
                lines.append(line)
    return lines


def _extras(names):
    with open(os.path.join(ROOT, 'setup.py')) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, 'id', '') == 'EXTRAS'
                                                for t in node.targets):
            extras = ast.literal_eval(node.value)
            return [req for name in names for req in extras[name]]
    raise SystemExit('error: setup.py defines no EXTRAS')


def for_python(requirements, version):
    """`requirements` whose markers hold on Python `version`, without their markers."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement
    env = {'python_version': version, 'python_full_version': version + '.0',
           'sys_platform': 'linux', 'platform_system': 'Linux', 'platform_machine': 'x86_64',
           'os_name': 'posix', 'implementation_name': 'cpython',
           'platform_python_implementation': 'CPython'}
    kept = []
    for line in requirements:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            kept.append(str(req))
    return kept


def resolve(requirements, version, platforms, no_deps=False):
    """pip's ERROR lines for `requirements` as wheels for CPython `version` on `platforms`
    (empty when every one resolves)."""
    with tempfile.TemporaryDirectory(prefix='segslim-wheels-') as target:
        cmd = [sys.executable, '-m', 'pip', 'install', '--dry-run', '--ignore-installed',
               '--disable-pip-version-check', '--quiet', '--only-binary=:all:',
               '--python-version', version, '--implementation', 'cp', '--target', target]
        for platform in platforms:
            cmd += ['--platform', platform]
        if no_deps:
            cmd.append('--no-deps')
        proc = subprocess.run(cmd + list(requirements), capture_output=True, text=True)
    if proc.returncode == 0:
        return []
    errors = [line.split(' (from versions:')[0] for line in proc.stderr.splitlines()
              if line.startswith('ERROR') and 'Ignored the following' not in line]
    return errors or [f'ERROR: pip exited with {proc.returncode}']


def default_paddle(version):
    """The paddle pin `make install` uses on Python `version` ('3.12' -> 2.6.2)."""
    return PADDLE_3 if tuple(map(int, version.split('.'))) >= (3, 13) else PADDLE_2


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--python_version', help='e.g. 3.13')
    p.add_argument('--paddle', help="make install's PADDLE (default: the one it picks for "
                   f'--python_version: {PADDLE_2} up to 3.12, {PADDLE_3} from 3.13)')
    p.add_argument('--default_paddle', action='store_true',
                   help="print make install's PADDLE for this Python and exit")
    p.add_argument('--platform', nargs='+', default=LINUX_X86_64,
                   help='wheel platform tags to accept (default: Linux x86_64)')
    args = p.parse_args(argv)
    if args.default_paddle:
        print(default_paddle('{}.{}'.format(*sys.version_info[:2])))
        return 0
    if args.python_version is None:
        p.error('--python_version is required (e.g. 3.13)')
    if not re.fullmatch(r'3\.\d+', args.python_version):
        p.error(f'--python_version takes a version like 3.13, got {args.python_version}')
    paddle = args.paddle or default_paddle(args.python_version)
    reqs = ([paddle] + _requirement_lines(os.path.join(ROOT, 'requirements.txt')) +
            _requirement_lines(os.path.join(ROOT, 'requirements-dev.txt')) +
            _extras(['openvino', 'onnx']))
    reqs = for_python(reqs, args.python_version)
    errors = (resolve(reqs, args.python_version, args.platform) +
              resolve(NO_DEPS, args.python_version, args.platform, no_deps=True))
    where = f'Python {args.python_version} with {paddle} ({args.platform[0]}...)'
    if errors:
        for line in errors:
            print(line)
        print(f'wheels-check: {where}: the install set does not resolve to wheels '
              f'({len(reqs) + len(NO_DEPS)} requirements checked)')
        return 1
    print(f'wheels-check: {where}: all {len(reqs) + len(NO_DEPS)} requirements resolve to wheels')
    return 0


if __name__ == '__main__':
    sys.exit(main())
