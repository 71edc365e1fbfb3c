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

.PHONY: run test test-fast lab data notebooks docs lint format bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,scale,docs,lancedb]'
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

# the tests that read what `make docs` builds (site/, from the notebooks executed into build/); every other
# test, the notebooks' static checks included, needs neither and runs first, so a unit failure shows in minutes
AFTER_DOCS := tests/test_site.py
PYTEST = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/pytest

## make test: install, lint, the unit tests and the notebooks' static checks, then every notebook executed
## into build/ and the site built (make docs), then the site opened in headless Chromium (tests/test_site.py);
## `make test PYTEST_ARGS="--random-order"` runs the tests in a random order (the seed is printed at the top of
## each of the two pytest runs). pytest's exit code 5 (no test collected) fails it like any other.
test: lint
	$(PYTEST) tests $(addprefix --ignore=,$(AFTER_DOCS)) --durations=15 $(PYTEST_ARGS)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(MAKE) --no-print-directory docs
	$(PYTEST) $(AFTER_DOCS) $(PYTEST_ARGS)

## make test-fast: the inner loop while you edit: lint and the tests not marked slow (torchrun launches,
## Ray, Chromium, benchmark runs); no notebook executed, no site built
test-fast: lint
	$(PYTEST) tests -m "not slow" $(PYTEST_ARGS)

## make bench: the full loader comparison of docs/benchmark.md and the README, warm and cold page cache, with
## the peers (WebDataset, MosaicML Streaming, LitData): 20,000 distinct 32x32 JPEGs and 2,000 photos. The
## `bench` extra lives in .venv-bench, apart from .venv: mosaicml-streaming requires transformers, which caps
## huggingface_hub below 1.0, so pip picks an older `datasets` there (pyproject.toml). The loader runs took
## 9-14 minutes on 2 cores, the object-storage counts of docs/object_storage_traffic.md come after them.
# 2 fragments each, one per worker: Lance's iterable LanceDataset (lance_iterable) hands whole fragments to
# workers (1 fragment leaves a worker idle), and random takes cost more the more fragments they span (20
# fragments of 1,000 rows halved the random-order loader's rate, docs/benchmark.md)
BENCH ?= $(BUILD)/bench
BENCH_VENV := .venv-bench
BENCH_PY := OMP_NUM_THREADS=1 $(BENCH_VENV)/bin/python
BENCH_ARGS := --batch-size 64 --workers 2 --epochs 4 --cache both
# lancedb: LanceDB's StreamingDataset (clumps, rows, decode in its threads) and Permutation, (o)-(r)
BENCH_PEERS := imagefolder_pil,imagefolder_tv,hf_datasets,lance_tv_uint8,lance_tv_uint8_block,lance_iterable,peers,lancedb

$(BENCH_VENV)/.installed: pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet -e '.[dev,scale,bench,lancedb]'
	$(BENCH_VENV)/bin/pip check
	touch $@

bench: $(BENCH_VENV)/.installed
	test -d $(BENCH)/img32 || $(BENCH_PY) -m lance_cookbook.bench.synthetic --output $(BENCH)/img32 --count 20000 \
		--size 32x32 --classes 10 --seed 0
	test -d $(BENCH)/img32.lance || $(BENCH_PY) -m data_prep.convert --source imagefolder:$(BENCH)/img32 \
		--output $(BENCH)/img32.lance --shuffle 0 --rows-per-file 10000 --no-progress
	$(BENCH_PY) -m lance_cookbook.bench --imagefolder $(BENCH)/img32 --lance $(BENCH)/img32.lance \
		--image-size 32 $(BENCH_ARGS) --loaders $(BENCH_PEERS) --work-dir $(BENCH)/work32 \
		--json $(BENCH)/bench-32px.json --plot $(BENCH)/bench-32px.png
	test -d $(BENCH)/photos || $(BENCH_PY) -m lance_cookbook.bench.synthetic --output $(BENCH)/photos --count 2000 \
		--size 500x375 --classes 10 --seed 0
	test -d $(BENCH)/photos.lance || $(BENCH_PY) -m data_prep.convert --source imagefolder:$(BENCH)/photos \
		--output $(BENCH)/photos.lance --shuffle 0 --rows-per-file 1000 --no-progress
	$(BENCH_PY) -m lance_cookbook.bench --imagefolder $(BENCH)/photos --lance $(BENCH)/photos.lance \
		--image-size 224 $(BENCH_ARGS) --loaders bound_pil,bound_tv,lance_pil_float32,$(BENCH_PEERS) \
		--work-dir $(BENCH)/work-photos --json $(BENCH)/bench-photos.json --plot $(BENCH)/bench-photos.png
	# object storage: requests and bytes per image at a local S3 server, then the round trips a loader waits
	# for with 300 ms added to every request (not the image folder: 20,000 x 300 ms); docs/object_storage_traffic.md
	$(BENCH_PY) -m lance_cookbook.bench.s3_traffic --imagefolder $(BENCH)/img32 --lance $(BENCH)/img32.lance \
		--work-dir $(BENCH)/s3-32px --json $(BENCH)/s3-traffic-32px.json
	$(BENCH_PY) -m lance_cookbook.bench.s3_traffic --imagefolder $(BENCH)/img32 --lance $(BENCH)/img32.lance \
		--work-dir $(BENCH)/s3-32px --formats lance_random,lance_block,webdataset,streaming,litdata \
		--delay-ms 300 --json $(BENCH)/s3-traffic-32px-300ms.json
	# images/s from a real S3 server (SeaweedFS's gateway behind Envoy, which delays every request 0, 10, 50 ms):
	# every loader, 2 workers, batch 64, new workers and empty caches each read, 4,000 distinct 32 px JPEGs
	$(BENCH_PY) -m lance_cookbook.bench.s3_latency --work-dir $(BENCH)/s3-latency --count 4000 \
		--json $(BENCH)/s3-latency-32px.json
	@echo "figures: $(BENCH)/bench-32px.{json,png} $(BENCH)/bench-photos.{json,png} $(BENCH)/s3-traffic-32px*.json" \
		"$(BENCH)/s3-latency-32px.json"

## make lab: JupyterLab on the notebooks
lab: $(VENV)/.installed data
	$(VENV)/bin/jupyter lab notebooks

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(BUILD) $(DATA) $(SITE) docs/chapters
