# rayrec: `make demo` runs the main job, `make test` the tests. Both install first when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check -q
STAMP := $(VENV)/.rayrec-installed
CONSTRAINTS := constraints.txt
# cuda when a GPU is visible (or RAYREC_DEVICE=cuda), else cpu
DEVICE := $(or $(RAYREC_DEVICE),$(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu))
FBGEMM := $(if $(filter cuda,$(DEVICE)),fbgemm-gpu==1.8.0,fbgemm-gpu-cpu==1.8.0)
# The default index's torch for Linux is the CUDA build (GBs of CUDA packages); the CPU build is on
# PyTorch's CPU index (the Dockerfile's CPU image uses the same one).
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# Where torch comes from when pip's find-links hold no torch wheel: the CPU index on CPU
# machines, the default index (the CUDA build, for fbgemm-gpu) on CUDA machines.
TORCH_INDEX := $(if $(filter cuda,$(DEVICE)),,--index-url $(TORCH_CPU_INDEX))
PYTEST_ARGS ?=

.PHONY: install demo test bench bench-mpzch bench-retrieval bench-hsnn bench-quality bench-synth1m bench-learned-vs-faiss bench-ranking bench-serve bench-training bench-continual chaos screenshots clean help

help:
	@echo "make demo     install, prepare ml-100k, train retriever + ranker on local Ray, serve, query (KEEP_SERVING=1 to stay up)"
	@echo "make test     install, then run the test suite"
	@echo "make install  create .venv with torch 2.13 (CPU; CUDA where nvidia-smi sees a GPU or RAYREC_DEVICE=cuda), fbgemm 1.8, torchrec 1.8, ray 2.60 and rayrec"
	@echo "make bench    every benchmark (docs/benchmarks/*.md and *.json)"
	@echo "make bench-quality  ml-100k Recall/NDCG over 3 seeds: two-tower with and without the sequential user tower, popularity, peers (~60 min on 2 shared cores: a sequential run takes 15)"
	@echo "make bench-synth1m  two-tower, MFLI, HSNN and FAISS on a 1,000,000-item catalogue (~65 min: 45 of training)"
	@echo "make bench-learned-vs-faiss  MFLI and HSNN vs FAISS IVF / IVF-RCQ / HNSW built over the same vectors, ml-100k (trains one run of each)"
	@echo "make bench-serve  Serve app over HTTP: saturation, SOLARIS on/off/sync, overload, autoscaling, SOLARIS vs a reactive cache (~25 min; alone: --parts solaris, ~10 min)"
	@echo "make bench-training  2-worker training: Ray Train vs torchrun, MPZCH cost per call, insert threads, runs_dir on local disk vs S3, and the churn run (TTL eviction vs none over simulated days; alone: --parts churn, ~35 min on 2 shared cores)"
	@echo "make bench-continual  freshness: an acknowledged click, and a new item (POST /items, MFLI), to the next recommendation, 2 Ingress replicas, ml-100k (~3 min); days: continual (rayrec train --continue) vs frozen vs daily full retrain over 4 simulated days x 3 seeds (~30 min; --parts days)"
	@echo "make screenshots  docs/img/ui.png (the /ui page, headless Chromium) and docs/img/dashboard.png (~2 min)"
	@echo "make chaos    fault injection: killed replicas, rollout, overload, killed workers (docs/benchmarks/reliability.md)"

install: $(STAMP)

# Re-run when the project's requirements change (stamp on pyproject.toml and the constraints).
$(STAMP): pyproject.toml $(CONSTRAINTS)
	@echo "== installing rayrec into $(VENV) (device: $(DEVICE))"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch: a local wheel when pip's find-links have one (--no-index looks only there; its own
	# dependencies come in the next call), else from TORCH_INDEX (see above).
	$(PIP) install -c $(CONSTRAINTS) --no-index --no-deps torch==2.13.0 2>/dev/null \
	  || $(PIP) install -c $(CONSTRAINTS) $(TORCH_INDEX) torch==2.13.0
	$(PIP) install -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -c $(CONSTRAINTS) $(FBGEMM)
	# torchrec's metadata asks for the CUDA fbgemm-gpu: install it alone, then its own needs.
	$(PIP) install -c $(CONSTRAINTS) --no-deps torchrec==1.8.0
	$(PIP) install -c $(CONSTRAINTS) tensordict torchmetrics==1.0.3 tqdm pyre-extensions iopath
	$(PIP) install -c $(CONSTRAINTS) -e '.[dev,k8s]'
	$(PY) -m embeddings.csrc.build
	$(PY) -c "import torch, torchrec, fbgemm_gpu, ray; print('torch', torch.__version__, 'torchrec', torchrec.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rayrec demo $(if $(KEEP_SERVING),--keep-serving,)

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: bench-mpzch bench-retrieval bench-hsnn bench-quality bench-synth1m bench-learned-vs-faiss bench-ranking bench-serve bench-training bench-continual

bench-mpzch: $(STAMP)
	$(PY) benchmarks/bench_mpzch.py

bench-retrieval: $(STAMP)
	$(PY) benchmarks/bench_retrieval.py

bench-hsnn: $(STAMP)
	$(PY) benchmarks/bench_hsnn.py

bench-quality: $(STAMP)
	$(PY) benchmarks/bench_quality.py

bench-synth1m: $(STAMP)
	$(PY) benchmarks/bench_synth1m.py

bench-learned-vs-faiss: $(STAMP)
	$(PY) benchmarks/bench_learned_vs_faiss.py

bench-ranking: $(STAMP)
	$(PY) benchmarks/bench_ranking.py

bench-serve: $(STAMP)
	$(PY) benchmarks/bench_serving.py

bench-training: $(STAMP)
	$(PY) benchmarks/bench_training.py

bench-continual: $(STAMP)
	$(PY) benchmarks/bench_continual.py

chaos: $(STAMP)
	$(PY) benchmarks/chaos.py

screenshots: $(STAMP)
	$(PY) -m serving.screenshots --out docs/img

clean:
	rm -rf runs/ .pytest_cache
