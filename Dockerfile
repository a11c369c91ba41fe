# syntax=docker/dockerfile:1
# resonance-sync in a small image: built in the Rust image, run from distroless as a non-root user.
#
#   docker build -t resonance-sync .
#   docker run --rm -e DATABASE_URL=... -e RESONANCE_API_KEY=... \
#       -v $PWD/config.toml:/etc/resonance-sync/config.toml:ro resonance-sync run
#
# docker-compose.yml uses it for the demo: `docker compose up`.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The caches keep the registry and compiled dependencies between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin resonance-sync \
    && install -D -m 0755 target/release/resonance-sync /out/resonance-sync

# glibc and libgcc, no shell, no package manager; runs as uid 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/resonance-sync /usr/local/bin/resonance-sync
COPY config.example.toml /etc/resonance-sync/config.example.toml
USER nonroot:nonroot
# [metrics] listen, when configured as 0.0.0.0:9464.
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/resonance-sync"]
CMD ["--config", "/etc/resonance-sync/config.toml", "run"]
