# Multi-stage build: compile in a Rust image, fetch the default model, run as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY configs ./configs
COPY tests ./tests
# The serving build: without the lab (eval, bench, gate training, charts).
RUN cargo build --release --locked --no-default-features --bin ttarag
COPY scripts ./scripts
RUN python3 -m pip config set global.break-system-packages true && bash scripts/fetch-model.sh

FROM debian:bookworm-slim
RUN useradd --create-home --uid 10001 ttarag
WORKDIR /app
COPY --from=build /src/target/release/ttarag /usr/local/bin/ttarag
COPY --from=build /src/models ./models
COPY configs ./configs
COPY index/samples ./index/samples
RUN mkdir -p index/collections && chown -R ttarag:ttarag /app
USER ttarag
EXPOSE 8080
# Inside a container the server must listen beyond loopback; publish the port explicitly.
ENV TTARAG_HOST=0.0.0.0
# No API key is baked in (anyone with the image would hold it), so the server starts open and
# warns so. Pass keys at run time to require them on every route but /health and /ready:
#   docker run -p 8080:8080 -e TTARAG_API_KEYS=KEY1,KEY2 -e TTARAG_ADMIN_KEY=ADMINKEY ttarag
# (`-e NAME` alone hands on the caller's variable; keys have 16+ printable ASCII characters).
ENTRYPOINT ["ttarag"]
CMD ["serve"]
