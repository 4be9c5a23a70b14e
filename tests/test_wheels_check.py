"""tools/wheels_check.py: the requirement set of another Python, read without its interpreter."""
import importlib.util
import os

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location('wheels_check',
                                              os.path.join(ROOT, 'tools', 'wheels_check.py'))
wheels_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheels_check)


def test_markers_are_evaluated_for_the_target_python_not_this_one():
    reqs = ['nncf==3.4.0; python_version>="3.10"', 'onnx==1.17.0; python_version<"3.9"',
            'onnxruntime==1.20.1; python_version=="3.10"', 'pyyaml']
    assert wheels_check.for_python(reqs, '3.9') == ['pyyaml']
    assert wheels_check.for_python(reqs, '3.10') == ['nncf==3.4.0', 'onnxruntime==1.20.1',
                                                     'pyyaml']
    assert wheels_check.for_python(reqs, '3.13') == ['nncf==3.4.0', 'pyyaml']


def test_the_install_set_holds_every_extra_and_requirement_file():
    reqs = wheels_check._requirement_lines(os.path.join(ROOT, 'requirements.txt'))
    assert 'pyyaml' in reqs and not any(r.startswith('#') for r in reqs)
    # what make install puts in without deps is what the check resolves without deps
    with open(os.path.join(ROOT, 'Makefile')) as f:
        no_deps = [line for line in f if '--no-deps' in line]
    assert len(no_deps) == 1 and no_deps[0].split('--no-deps')[1].split() == wheels_check.NO_DEPS
    extras = wheels_check._extras(['openvino', 'onnx'])
    assert any(r.startswith('openvino==') for r in extras)
    assert any(r.startswith('onnxruntime==') for r in extras)


def test_the_paddle_of_each_python():
    assert wheels_check.default_paddle('3.9') == wheels_check.default_paddle('3.12') == \
        'paddlepaddle==2.6.2'
    assert wheels_check.default_paddle('3.13') == wheels_check.default_paddle('3.14') == \
        'paddlepaddle==3.2.2'


def test_a_version_that_is_not_one_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        wheels_check.main(['--python_version', 'three'])
    assert e.value.code == 2 and '--python_version' in capsys.readouterr().err
