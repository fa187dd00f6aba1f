# One command each: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup setup-gpu demo test test-fast bench clean

$(BIN)/squeeze: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# constraints.txt pins the CPU build of torch (an unpinned torch pulls GB of CUDA packages)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[torch,minilm,test,ray,plot,onnx,gguf,compressed-tensors,lm-eval,mteb]"
	touch $(BIN)/squeeze

setup: $(BIN)/squeeze

# The same install with torch's CUDA build (same version, from PyTorch's CUDA index) instead of the CPU pin.
CUDA_INDEX ?= https://download.pytorch.org/whl/cu128
setup-gpu:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --extra-index-url $(CUDA_INDEX) -e ".[torch,minilm,test,plot,onnx,gguf,compressed-tensors,lm-eval,mteb]"

demo: setup
	$(BIN)/squeeze run specs/minilm-edge.squeeze --force

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# llm-compressor pins an older transformers than ours: it gets a venv of its own that borrows our torch
LLMC := benchmarks/cache/llmc-venv

$(LLMC)/ready: constraints.txt
	$(PYTHON) -m venv $(LLMC)
	$(BIN)/python -c "import site; print(site.getsitepackages()[0])" > \
	    "$$($(LLMC)/bin/python -c 'import site; print(site.getsitepackages()[0])')/main.pth"
	$(LLMC)/bin/python -m pip install --quiet -c constraints.txt llmcompressor
	touch $(LLMC)/ready

bench: setup $(LLMC)/ready
	# the library peers and runtimes (Torch-Pruning, ONNX Runtime, llama.cpp: builds from source, minutes) are only needed here
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(BIN)/python -m benchmarks

clean:
	rm -rf out specs/out .pytest_cache
