# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   ?= data
BUILD  ?= build
SITE   ?= site
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
# an executed copy is stale when its notebook or the code it runs changed
EXECUTED  := $(patsubst notebooks/%,$(BUILD)/%,$(NOTEBOOKS))
PACKAGE_SOURCES := $(shell find lance_cookbook data_prep -name '*.py')
DOCS_SOURCES := mkdocs.yml $(shell find docs -type f -not -path 'docs/chapters/*' -not -path 'docs/screenshots/*')
EXECUTE = $(VENV)/bin/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=900 \
	--ExecutePreprocessor.kernel_name=python3 --output-dir $(BUILD)

.PHONY: run test lab data notebooks docs lint format bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,scale,docs]'
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
		$(EXECUTE) "$$nb" || exit 1; \
	done
	@echo "executed notebooks are in $(BUILD)/"

# one chapter, executed into build/ when missing or stale (a failing cell fails it and writes nothing)
$(BUILD)/%.ipynb: notebooks/%.ipynb $(PACKAGE_SOURCES) | $(VENV)/.installed
	@mkdir -p $(BUILD)
	@echo "executing $<"
	@$(EXECUTE) "$<"

## make docs: the site in site/ from the executed notebooks (executing those missing or stale first)
docs: $(SITE)/index.html

$(SITE)/index.html: $(EXECUTED) $(DOCS_SOURCES) $(PACKAGE_SOURCES) | $(VENV)/.installed
	rm -rf docs/chapters && mkdir -p docs/chapters && cp $(EXECUTED) docs/chapters/
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --quiet
	@touch $@
	@echo "site built: open $(SITE)/index.html or run: python -m http.server -d $(SITE)"

## make test: install, lint, every notebook executed into build/ and the site built (make docs), then the
## unit tests, the notebooks' static checks and the site opened in headless Chromium (tests/test_site.py)
test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(MAKE) --no-print-directory docs
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/pytest tests

## make bench: the full loader comparison of docs/benchmark.md (20,000 distinct 32x32 JPEGs, warm and cold page
## cache, WebDataset, MosaicML Streaming and LitData); the peers live in .venv-peers, apart from .venv, because
## mosaicml-streaming's dependencies break `datasets` (lance_cookbook/bench/requirements-peers.txt)
BENCH ?= $(BUILD)/bench
PEERS := .venv-peers
bench: $(VENV)/.installed
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install --quiet -r lance_cookbook/bench/requirements-peers.txt
	$(PEERS)/bin/pip check
	test -d $(BENCH)/img32 || $(PY) -m lance_cookbook.synthetic --output $(BENCH)/img32 --count 20000 \
		--size 32x32 --classes 10 --seed 0
	test -d $(BENCH)/shuffled.lance || $(PY) -m data_prep.convert --source imagefolder:$(BENCH)/img32 \
		--output $(BENCH)/shuffled.lance --shuffle 0 --no-progress
	OMP_NUM_THREADS=1 PYTHONPATH=. $(PEERS)/bin/python -m lance_cookbook.bench --imagefolder $(BENCH)/img32 \
		--lance $(BENCH)/shuffled.lance --image-size 32 --batch-size 64 --workers 2 --epochs 4 --cache both \
		--loaders imagefolder_pil,imagefolder_tv,lance_tv_uint8,lance_tv_uint8_block,peers \
		--work-dir $(BENCH)/work --json $(BENCH)/bench-32px-peers.json --plot $(BENCH)/bench-32px-peers.png

## make lab: JupyterLab on the notebooks
lab: $(VENV)/.installed data
	$(VENV)/bin/jupyter lab notebooks

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(BUILD) $(DATA) $(SITE) docs/chapters
