# Every target builds .venv from setup.cfg first, so a fresh clone needs nothing installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint format demo teachers cards bench reproduce reproduce-given-teacher gpu-check gpu-wheels clean

install: $(STAMP)

# After the package: transformers' own common model tests, from the sdist of the installed transformers, into the
# ignored .venv/transformers-tests. The step never fails the install: without the files (no network),
# tests/test_transformers_common.py skips and says what is missing.
$(STAMP): setup.cfg pyproject.toml tests/helpers/fetch_transformers_tests.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python tests/helpers/fetch_transformers_tests.py --output_dir $(VENV)/transformers-tests
	touch $(STAMP)

# One pytest-xdist worker per core (CI has 2), a test file's tests on one worker so that its fixtures are built once.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=25

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# The shipped stage-1 teachers (model_cards/teachers/: the demo's, on the canvas digits, and CIFAR-10's at the
# reproduction's shape), each trained until its linear probe stops rising, probed every few hundred steps; about an
# hour each on 2 CPU cores. Stopped and started again, it goes on from the last probe (outputs/teachers/).
teachers: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python scripts/train_teachers.py --max_minutes 90

# The committed model cards: every model_cards/<name>/ with a results.json, its README.md rendered again by
# mimco-card from the config.json and results.json beside it (model_cards/README.md; tests/test_model_cards_committed.py
# fails when a committed card differs from what this writes).
cards: $(STAMP)
	for card in $(patsubst %/results.json,%,$(wildcard model_cards/*/results.json)); do \
		$(BIN)/python scripts/make_model_card.py --checkpoint_dir $$card --results_file $$card/results.json \
			--hub_model_id your-namespace/$$(basename $$card) --overwrite_output || exit 1; \
	done

# ViT-S/16 at 224, batch 16, on this machine's CPU: MimCo step vs compute floor vs stock-transformers reference,
# and the data pipeline vs run_mim.py's. One thread and CPU time, so that a shared machine still gives steady ratios
# (docs/benchmarks.md); `--timer wall` and more threads measure elapsed time on a machine of your own.
bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python scripts/benchmark.py --model_preset vit-small-patch16 --batch_size 16 \
		--repeats 5 --warmup 1 --timer cpu --output_json outputs/benchmark.json

# the small-scale reproduction on CIFAR-10: 3 pre-training seeds sharing one teacher, about 2 hours on 2 CPU cores;
# results (and the comparisons against the seed spread) go to docs/results/
reproduce: $(STAMP)
	$(BIN)/python scripts/reproduce.py --seeds 0 1 2 --rows pixels random_init teacher pixel_mim pixel_mim_matched mimco

# The paper's setting: every student starts from the shipped CIFAR-10 teacher (model_cards/teachers/cifar10), which is
# evaluated, not trained; the main table's 690 student steps, and pixel MIM again at the student's compute.
reproduce-given-teacher: $(STAMP)
	$(BIN)/python scripts/reproduce.py --seeds 0 1 2 --rows pixels random_init teacher pixel_mim pixel_mim_matched mimco \
		--teacher_name_or_path model_cards/teachers/cifar10 --pretrain_steps 690 \
		--output_dir outputs/reproduce-given-teacher --results_dir docs/results/given_teacher

# The GPU check on one CUDA GPU, at most 8 minutes: correctness against the CPU, bf16 / torch.compile / SDPA / fused
# AdamW, ViT-S training throughput and MFU, the loader against the step, the CIFAR-10 reproduction. Report in
# outputs/gpu_check/report.{md,json}, to be copied to docs/gpu/. On a machine whose Python already has the
# dependencies (a lent GPU machine), `make gpu-check GPU_PYTHON=python3` skips building .venv.
GPU_PYTHON ?=
GPU_CHECK_FLAGS ?=
gpu-check:
	$(if $(GPU_PYTHON),,$(MAKE) install)
	$(if $(GPU_PYTHON),$(GPU_PYTHON),$(BIN)/python) scripts/gpu_check.py --output_dir outputs/gpu_check $(GPU_CHECK_FLAGS)

# Wheels of the packages that the lent GPU machines' image (Python 3.12) lacks, into the ignored .whl/, to travel with
# the device run (docs/gpu/README.md has the command).
GPU_WHEELS := datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 evaluate==0.4.6
gpu-wheels:
	python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
