from setuptools import find_packages, setup

setup(
    name='segslim',
    version='0.1.0',
    description='Quantization-aware training and INT8 deployment for PaddleSeg models',
    packages=find_packages(include=['segslim', 'segslim.*']),
    python_requires='>=3.8',
    # paddlepaddle / paddlepaddle-gpu and paddleseg are installed by `make install`
    # (see requirements.txt for why paddleseg goes in without its pins).
    install_requires=['paddleslim==2.6.0', 'numpy<2', 'opencv-python==4.6.0.66', 'pyyaml',
                      'visualdl', 'decorator'],
    entry_points={'console_scripts': [
        'segslim-train=segslim.commands:train',
        'segslim-val=segslim.commands:val',
        'segslim-export=segslim.commands:export',
        'segslim-qat-train=segslim.commands:qat_train',
        'segslim-qat-val=segslim.commands:qat_val',
        'segslim-qat-export=segslim.commands:qat_export',
        'segslim-infer=segslim.commands:infer',
        'segslim-benchmark=segslim.commands:benchmark',
        'segslim-make-demo-dataset=segslim.commands:make_demo_dataset',
    ]},
)
