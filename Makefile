# make install  -> .venv with the pinned stack: paddlepaddle 2.6.2 on Python 3.9-3.12, 3.2.2 on
#                 3.13 (PADDLE=paddlepaddle==3.2.2 chooses it anywhere; PADDLE=paddlepaddle-gpu==...
#                 on GPU machines)
# make demo     -> generated data, FP32 train/val/export, QAT train/val/export, PTQ, FP32-vs-INT8
#                 report on Paddle Inference, OpenVINO and onnxruntime (report.md, charts, gallery)
# make test     -> the test suite
# make lint     -> ruff (pyproject.toml rule sets) and mypy over segslim/
# make bench    -> docs/benchmark.md: latency FP32 vs bf16 vs INT8 of the shipped configs on Paddle
#                 Inference, OpenVINO and onnxruntime, against the CPU's ceiling and the engines'
#                 own quantizers (hours; a killed run goes on from its last finished model)
# make street   -> synthetic 19-class street scenes (data/street) and four zoo models of
#                 configs/street trained on them (output/street/<model>; hours on 2 CPU cores,
#                 docs/accuracy.md); STREET_ITERS=N shortens every schedule, STREET_MODELS=...
#                 picks models (fcn_hrnetw18: the larger HRNet, hours more)
# make street-compare -> every quantization method and the engines' own quantizers on each
#                 trained street model, on every engine (output/street/<model>/compare/compare.md)
# make wheels-check PY_VERSION=3.13 -> whether make install's packages exist as wheels there
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# paddlepaddle 2.6.2 up to Python 3.12, 3.2.2 on 3.13 and later (tools/wheels_check.py says why)
PADDLE ?= $(shell $(PYTHON) tools/wheels_check.py --default_paddle)
STAMP := $(VENV)/.installed

DEMO_CFG := configs/quick_start/bisenet_optic_disc_demo.yml
DEMO_OUT ?= output/demo
# ONNX export needs paddle2onnx, which has no wheel for Python 3.13: there the demo runs
# without the ONNX files and the onnxruntime rows (read when the demo runs, after install)
DEMO_ONNX = $(shell $(PY) -c 'import paddle2onnx' >/dev/null 2>&1 && echo --to_onnx)
DEMO_BACKENDS = paddle openvino $(if $(DEMO_ONNX),onnxruntime)

.PHONY: install demo test test-fast lint bench street street-compare clean wheels-check

install: $(STAMP)

# Whether `make install`'s set exists as wheels for another Python (pip's resolver, no such
# interpreter needed): make wheels-check PY_VERSION=3.13 [PADDLE=paddlepaddle==2.6.2]; without
# PADDLE, the paddle make install would pick on that Python
PY_VERSION ?= 3.11
wheels-check:
	$(PYTHON) tools/wheels_check.py --python_version $(PY_VERSION) \
		$(if $(filter file,$(origin PADDLE)),,--paddle "$(PADDLE)")

$(STAMP): requirements.txt requirements-dev.txt setup.py segslim/zlib_hook.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "setuptools<81" wheel "$(PADDLE)" -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps paddleslim==2.6.0 paddleseg==2.8.0
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[openvino,onnx]"
	$(PY) -c "from segslim.zlib_hook import install; print('zlib bound at start-up by', install())"
	$(PY) tools/check_install.py
	touch $(STAMP)

demo: install
	$(PY) tools/make_demo_dataset.py --save_dir data/optic_disc_demo
	$(PY) train.py --config $(DEMO_CFG) --do_eval --save_interval 100 --log_iters 50 --seed 0 \
		--save_dir $(DEMO_OUT)/fp32
	$(PY) val.py --config $(DEMO_CFG) --model_path $(DEMO_OUT)/fp32/best_model/model.pdparams
	$(PY) export.py --config $(DEMO_CFG) --model_path $(DEMO_OUT)/fp32/best_model/model.pdparams \
		--save_dir $(DEMO_OUT)/fp32_infer $(DEMO_ONNX)
	$(PY) slim/quant/qat_train.py --config $(DEMO_CFG) \
		--model_path $(DEMO_OUT)/fp32/best_model/model.pdparams --learning_rate 0.001 \
		--iters 100 --do_eval --save_interval 50 --log_iters 50 --seed 0 --save_dir $(DEMO_OUT)/quant
	$(PY) slim/quant/qat_val.py --config $(DEMO_CFG) \
		--model_path $(DEMO_OUT)/quant/best_model/model.pdparams
	$(PY) slim/quant/qat_export.py --config $(DEMO_CFG) \
		--model_path $(DEMO_OUT)/quant/best_model/model.pdparams --save_dir $(DEMO_OUT)/quant_infer \
		$(DEMO_ONNX)
	$(PY) slim/quant/ptq.py --config $(DEMO_CFG) \
		--model_path $(DEMO_OUT)/fp32/best_model/model.pdparams --save_dir $(DEMO_OUT)/ptq_infer \
		$(DEMO_ONNX)
	$(PY) deploy/python/benchmark.py --config $(DEMO_CFG) \
		--model_dirs $(DEMO_OUT)/fp32_infer $(DEMO_OUT)/quant_infer $(DEMO_OUT)/ptq_infer \
		--backend $(DEMO_BACKENDS) --peers \
		--report_dir $(DEMO_OUT)/report
	@echo "Report (table, charts, gallery of where INT8 differs): $(DEMO_OUT)/report/report.md"

# Three workers on the 2 cores: with one per core the cores sat idle 10 % of the suite (a worker
# waiting for another to make a shared fixture, or for a child process to start), and the
# suite took 8:38 against 7:47 with three (AMD EPYC, AVX2 only). A test file stays on one
# worker, so its module fixtures run once. Commands that fork data workers run in their own
# process (tests/conftest.py run_command).
PYTEST := $(PY) -m pytest -q -n 3 --dist loadfile

test: install
	$(PYTEST) tests

test-fast: install
	$(PYTEST) -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: install
	$(PY) tools/bench_models.py --backend paddle openvino onnxruntime --repeats 5 --out docs/benchmark.md

STREET_MODELS ?= bisenetv2 pp_liteseg_stdc1 segformer_b0 fcn_hrnetw18_small
STREET_ITERS ?=

street: install
	$(PY) tools/make_street_dataset.py --save_dir data/street
	for m in $(STREET_MODELS); do \
		$(PY) train.py --config configs/street/$${m}_street_256x128.yml --do_eval --seed 0 \
			--save_interval 250 --log_iters 50 $(if $(STREET_ITERS),--iters $(STREET_ITERS)) \
			--save_dir output/street/$$m || exit 1; \
	done

STREET_QAT_ITERS ?= 200
# every street model is exported at the data's one size: PP-LiteSeg's adaptive pooling
# converts to ONNX only at a fixed input
STREET_SHAPE ?= 1 3 128 256
street-compare: install
	for m in $(STREET_MODELS); do \
		$(PY) tools/compare_methods.py --config configs/street/$${m}_street_256x128.yml \
			--model_path output/street/$$m/best_model/model.pdparams \
			--qat_iters $(STREET_QAT_ITERS) --export_shape $(STREET_SHAPE) \
			--save_dir output/street/$$m/compare || exit 1; \
	done

clean:
	rm -rf output data/optic_disc_demo data/street .pytest_cache
