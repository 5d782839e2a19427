# The README's two commands: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python3

.PHONY: install demo test

# torch is pinned here, not in requirements.txt: an unpinned torch pulls the CUDA wheels (gigabytes),
# while 2.13.0 finds the CPU build on machines that carry it.
install:
	$(PYTHON) -m pip install -q torch==2.13.0 -r requirements.txt pytest

demo: install
	bash scripts/run_demo.sh

test: install
	$(PYTHON) -m pytest -q tests
