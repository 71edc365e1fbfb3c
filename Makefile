# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   ?= data
BUILD  ?= build
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))

.PHONY: run test lab data notebooks lint format bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,scale]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (lance-cookbook)" >/dev/null
	touch $@

## make run: install, convert the embedded digits dataset, execute every notebook into build/
run: $(VENV)/.installed data notebooks

data: $(VENV)/.installed
	$(PY) -c "from data_prep.digits import ensure_digits; print(ensure_digits('$(DATA)', progress=True))"

notebooks: $(VENV)/.installed
	@mkdir -p $(BUILD)
	@for nb in $(NOTEBOOKS); do \
		echo "executing $$nb"; \
		$(VENV)/bin/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=900 \
			--ExecutePreprocessor.kernel_name=python3 --output-dir $(BUILD) "$$nb" || exit 1; \
	done
	@echo "executed notebooks are in $(BUILD)/"

## make test: install, lint, unit tests and every notebook under nbmake
test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/pytest tests --nbmake notebooks

## make lab: JupyterLab on the notebooks
lab: $(VENV)/.installed data
	$(VENV)/bin/jupyter lab notebooks

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(BUILD) $(DATA)
