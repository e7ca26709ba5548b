# Every target builds .venv from setup.cfg first, so a fresh clone needs nothing installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint format demo bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# ViT-S/16 at 224, batch 16, on this machine's CPU: MimCo step vs compute floor vs stock-transformers reference,
# and the data pipeline vs run_mim.py's
bench: $(STAMP)
	$(BIN)/python scripts/benchmark.py --model_preset vit-small-patch16 --batch_size 16 --output_json outputs/benchmark.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
