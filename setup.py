import re

from setuptools import find_packages, setup

with open('segslim/__init__.py') as f:  # the version is written there, once
    VERSION = re.search(r"__version__ = '([^']+)'", f.read()).group(1)

# Optional engines, pinned to releases that install beside paddlepaddle 2.6 and numpy<2 (nncf
# needs Python 3.10+); the older pins are the last wheels published for those Pythons. Newer
# onnx and ml-dtypes require numpy 2, which opencv-python 4.6 does not run on.
EXTRAS = {
    'openvino': ['openvino==2026.4.1; python_version>="3.10"',
                 'openvino==2025.3.0; python_version=="3.9"',
                 'openvino==2024.4.0; python_version<"3.9"',
                 'nncf==3.4.0; python_version>="3.10"'],
    # paddle2onnx has no wheel for Python 3.13 (up to 2.1.0): no ONNX export there
    'onnx': ['paddle2onnx==1.2.11; python_version<"3.13"',
             'onnx==1.19.1; python_version>="3.9"', 'onnx==1.17.0; python_version<"3.9"',
             'ml-dtypes==0.5.3; python_version>="3.9"',
             # onnxruntime's quant_pre_process (the onnxruntime peer, segslim.bench.peers)
             'sympy==1.14.0; python_version>="3.9"', 'sympy==1.12.1; python_version<"3.9"',
             'onnxruntime==1.32.0; python_version>="3.11"',
             'onnxruntime==1.20.1; python_version=="3.10"',
             'onnxruntime==1.19.2; python_version<"3.10"'],
}

setup(
    name='segslim',
    version=VERSION,
    description='Quantization-aware training and INT8 deployment for PaddleSeg models',
    packages=find_packages(include=['segslim', 'segslim.*']),
    python_requires='>=3.9',
    # paddlepaddle / paddlepaddle-gpu, paddleslim and paddleseg are installed by `make install`
    # (see requirements.txt for why paddleslim and paddleseg go in without their pins).
    install_requires=['numpy<2; python_version<"3.13"', 'numpy>=2,<3; python_version>="3.13"',
                      'opencv-python==4.6.0.66; python_version<"3.13"',
                      'opencv-python==4.10.0.84; python_version>="3.13"', 'pyyaml',
                      'visualdl', 'decorator'],
    extras_require=EXTRAS,
    entry_points={'console_scripts': [
        'segslim-train=segslim.cli.commands:train',
        'segslim-val=segslim.cli.commands:val',
        'segslim-export=segslim.cli.commands:export',
        'segslim-qat-train=segslim.cli.commands:qat_train',
        'segslim-qat-val=segslim.cli.commands:qat_val',
        'segslim-qat-export=segslim.cli.commands:qat_export',
        'segslim-ptq=segslim.cli.commands:ptq',
        'segslim-quant-analysis=segslim.cli.commands:analysis',
        'segslim-auto-quant=segslim.cli.commands:auto_quant',
        'segslim-infer=segslim.cli.commands:infer',
        'segslim-benchmark=segslim.cli.commands:benchmark',
        'segslim-make-demo-dataset=segslim.cli.tools:make_demo_dataset',
        'segslim-make-street-dataset=segslim.cli.tools:make_street_dataset',
    ]},
)
