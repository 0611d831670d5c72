# Two commands do all the set-up on a fresh machine:
#   make demo   run ncf-stream on a local Kafka broker with a demo stream
#   make test   run the test suite (starts its own broker)
SHELL := /bin/bash
ENSURE_VENV = venv=$$(scripts/ensure-venv)
PYTEST_ARGS ?=

.PHONY: demo test lint bench venv broker-start broker-stop

venv:
	@scripts/ensure-venv

demo:
	@$(ENSURE_VENV) && $$venv/bin/ncf-stream demo

test:
	@$(ENSURE_VENV) && $$venv/bin/python -m pytest $(PYTEST_ARGS)

lint:
	@$(ENSURE_VENV) && $$venv/bin/ruff check . && $$venv/bin/mypy

# bench/quality.py, levers.py, quality_anonymous.py and batch_curve.py need a ratings file; MovieLens is not
# part of the product.
QUALITY_DATA ?= ../shared/data/ml-latest-small/ratings.csv

bench:
	@$(ENSURE_VENV) && for b in bench/*.py; do \
	  if [ $$b = bench/quality.py ] || [ $$b = bench/levers.py ] || [ $$b = bench/quality_anonymous.py ] \
	     || [ $$b = bench/batch_curve.py ]; then \
	    [ -f "$(QUALITY_DATA)" ] || { echo "== $$b skipped: no $(QUALITY_DATA)"; continue; }; \
	    echo "== $$b"; $$venv/bin/python $$b "$(QUALITY_DATA)" --quick | tail -n 1; continue; \
	  fi; \
	  echo "== $$b"; $$venv/bin/python $$b --quick | tail -n 1; done

broker-start:
	deploy/kafka/kafka.sh start

broker-stop:
	deploy/kafka/kafka.sh stop
