# make setup   install the dependencies (CPU torch by default; TORCH_SPEC="torch" for your CUDA build)
# make demo    offline CPU demo: SFT of a small SEDD on arithmetic (15-20 min on 2 cores), then evaluation
# make demo-noisy  the RL demo's second start: the same SFT on answers 30% off by one (demo/arithmetic_noisy)
# make test    the test suite (CPU, no network)
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 0

.PHONY: setup test demo demo-noisy lint format

setup:
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -r requirements-dev.txt

test:
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -x --timeout=600

demo:
	HF_HUB_OFFLINE=1 $(PYTHON) sft.py experiment=demo hydra.run.dir=exp_local/demo/sft
	HF_HUB_OFFLINE=1 $(PYTHON) evaluate.py --model_path exp_local/demo/sft --dataset demo/arithmetic --split test --limit 200 --output exp_local/demo/eval.json

demo-noisy:
	HF_HUB_OFFLINE=1 $(PYTHON) sft.py experiment=demo sft.dataset=demo/arithmetic_noisy hydra.run.dir=exp_local/demo/sft_noisy

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .
