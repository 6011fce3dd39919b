# One command to set up and test, one to set up and run the demo. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv test demo clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The registry's regular torch build (the CPU-only wheel on some machines cannot load torchvision),
	# pinned by constraints.txt to the one xformers was built for.
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	$(PY) -c "import torchvision, torch_fidelity, diffusers, transformers, peft; print('environment ok: torch', __import__('torch').__version__)"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

demo: venv
	$(VENV)/bin/restune-sd demo --out demo-out

clean:
	rm -rf $(VENV) demo-out
