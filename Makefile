# The two commands of the README:
#   make run   - fetch the model, build, and serve the default RAG server on 127.0.0.1:8080
#   make test  - fetch what the tests need, run the whole suite, and check the serving build
#                (no lab: see scripts/check-serving-build.sh)
.PHONY: run test setup bench lint

setup:
	bash scripts/setup.sh

run: setup
	cargo run --release -- serve

test: setup
	cargo test --locked --all-targets
	bash scripts/check-serving-build.sh

bench: setup
	cargo run --release -- bench

# The sample collection's domain adapter (index/adapters/qasc), from the QASC dev-train questions.
.PHONY: adapt
adapt: setup
	cargo run --release -- index build --collection qasc --input index/samples/qasc/corpus.jsonl
	cargo run --release -- index adapt --collection qasc --questions data/qasc/questions.jsonl \
	    --system "Answer the question with a short phrase."

# Loopback load test of a server already started with `make run` (it starts none itself):
# make load ARGS='--requests 6 --concurrency 1,2 --storm 4'
.PHONY: load
load:
	python3 scripts/load.py $(ARGS)

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
