# Everything a fresh clone needs, with nothing installed but Python 3.11.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := sample_models/repvgg_net.ts_preserve.onnx

.PHONY: demo test fuzz bench samples clean

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

fuzz: $(BIN)/onnxfold
	ONNXFOLD_FUZZ_EXAMPLES=5000 $(BIN)/python -m pytest -q tests/test_fuzz.py

bench: $(BIN)/onnxfold
	$(BIN)/python bench/run.py

# Regenerate sample_models/ (needs PyTorch: kept out of the project's dependencies).
samples:
	$(PYTHON) -m venv .venv-export
	.venv-export/bin/python -m pip install --quiet torch==2.13.0 onnx onnxscript onnxruntime numpy
	.venv-export/bin/python sample_models/make_samples.py

clean:
	rm -rf build $(VENV) *.egg-info
