"""Checks the installed stack: imports (with the zlib fix), versions, and `pip check`
apart from paddleslim's and paddleseg's known pins. Exits non-zero on any other problem."""
import importlib
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

# paddleslim and paddleseg are installed without their pins (requirements.txt says why);
# paddleslim's swig is a build tool it declares and never imports
KNOWN = ('paddleseg 2.8.0 has requirement opencv-python<=4.6.0',
         'paddleslim 2.6.0 has requirement opencv-python==4.6.0.66',
         'paddleslim 2.6.0 requires swig,')


def main() -> int:
    from segslim._paddle import paddle
    # after segslim, which binds zlib and quiets paddle's import-time warnings first
    paddleseg = importlib.import_module('paddleseg')
    importlib.import_module('paddleslim')
    print(f'paddlepaddle {paddle.__version__} (CUDA: {paddle.is_compiled_with_cuda()}), '
          f'paddleseg {paddleseg.__version__}')
    for extra in ('openvino', 'nncf', 'paddle2onnx', 'onnx', 'onnxruntime'):  # optional engines
        try:
            module = __import__(extra)
            print('{} {}'.format(extra, getattr(module, '__version__', '?')))
        except ImportError:
            print(f'{extra}: not installed (optional)')
    out = subprocess.run([sys.executable, '-m', 'pip', 'check'], capture_output=True,
                         text=True).stdout
    problems = [line for line in out.splitlines()
                if line.strip() and not line.startswith(KNOWN) and
                not line.startswith('No broken requirements')]
    for line in problems:
        print('pip check: ' + line)
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
