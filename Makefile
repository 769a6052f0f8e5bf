# Everything a fresh clone needs, with nothing installed but Python 3.11.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := sample_models/repvgg_net.ts_preserve.onnx

.PHONY: demo test fuzz cuda-check bench samples benchset bench-public clean

$(BIN)/onnxfold: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/onnxfold
	mkdir -p build
	$(BIN)/onnxfold optimize $(DEMO) build/demo.onnx --json build/demo.json
	$(BIN)/onnxfold verify $(DEMO) build/demo.onnx --iterations 20

test: $(BIN)/onnxfold
	$(BIN)/python -m pytest -q

# SEED=n draws other graphs than the derandomized default (the same on every run).
fuzz: $(BIN)/onnxfold
	ONNXFOLD_FUZZ_EXAMPLES=5000 ONNXFOLD_FUZZ_SEED=$(SEED) $(BIN)/python -m pytest -q tests/test_fuzz.py

# verify's CUDA reporting against the real onnxruntime-gpu wheel, in its own venv: that
# wheel (about 256 MB) in place of onnxruntime, without the CUDA/cuDNN libraries (GBs more;
# on a GPU machine add them with ORT_GPU='onnxruntime-gpu[cuda,cudnn]'). onnxfold's other
# dependencies come from setup.cfg, then onnxfold itself without them.
GPU_VENV := .venv-gpu
ORT_GPU  ?= onnxruntime-gpu
GPU_DEPS  = $(shell $(PYTHON) -c "import configparser; c = configparser.ConfigParser(); \
	c.read('setup.cfg'); print(' '.join(repr(d) for d in c['options']['install_requires'].split() \
	if not d.startswith('onnxruntime')))")

$(GPU_VENV)/bin/onnxfold: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(GPU_VENV)/bin/python -m pip install --quiet '$(ORT_GPU)' $(GPU_DEPS) 'pytest>=7'
	$(GPU_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

cuda-check: $(GPU_VENV)/bin/onnxfold
	ONNXFOLD_CUDA_CHECK=1 $(GPU_VENV)/bin/python -m pytest -q tests/test_cuda_provider.py

bench: $(BIN)/onnxfold
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Regenerate sample_models/ (needs PyTorch: kept out of the project's dependencies).
samples:
	$(PYTHON) -m venv .venv-export
	.venv-export/bin/python -m pip install --quiet torch==2.13.0 onnx onnxscript onnxruntime numpy
	.venv-export/bin/python sample_models/make_samples.py

# The public-model set (torchvision, transformers, timm, ultralytics with random weights) and
# onnxsim/onnxslim to compare with: a venv of its own, never a dependency of onnxfold.
BENCH_VENV := .venv-benchset
BENCHSET   ?= build/benchset

$(BENCH_VENV)/bin/onnxfold: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet torch==2.13.0 torchvision transformers timm ultralytics \
		onnx onnxscript onnxruntime onnxsim onnxslim numpy
	$(BENCH_VENV)/bin/python -m pip install --quiet -e .
	touch $@

# Export the set into $(BENCHSET) (about 10 minutes on 2 cores).
benchset: $(BENCH_VENV)/bin/onnxfold
	$(BENCH_VENV)/bin/python bench/public/make_set.py --out $(BENCHSET)

# onnxfold against onnxsim and onnxslim on the set (about 15 minutes on 2 cores).
bench-public: $(BENCH_VENV)/bin/onnxfold
	test -f $(BENCHSET)/manifest.json || $(MAKE) benchset
	$(BENCH_VENV)/bin/python bench/public/compare.py --set $(BENCHSET)

clean:
	rm -rf build $(VENV) $(GPU_VENV) *.egg-info
