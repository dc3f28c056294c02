# syntax=docker/dockerfile:1
# sluice's image: one static binary on a minimal base. `make image` builds
# it. The build stage runs the same make targets CI runs (.ci/run):
# deps-generate and generate recompile bpf/*.c with clang-14 into the
# bpf2go objects, and build links the binary with CGO_ENABLED=0.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN make deps-generate generate build VERSION=${VERSION}

# distroless/static: no shell, no package manager, CA certificates and
# tzdata only. The DaemonSet sets each container's user explicitly.
# distroless publishes no version tags: pin a digest in your pipeline
# (docker buildx imagetools inspect gcr.io/distroless/static-debian12).
FROM gcr.io/distroless/static-debian12
COPY --from=build /src/bin/sluice /sluice
ENTRYPOINT ["/sluice"]
