# syntax=docker/dockerfile:1
# marketplace-sidecar image. Runs as UID 10001, works with a read-only root filesystem, and
# carries no compiler, pip cache or source tree.
#
# Base: Debian 12 (bookworm) with Debian's own python3 (3.11.2 plus Debian's security fixes).
# CI builds this same file on a bookworm root filesystem made from the Debian archive
# (scripts/build-image.sh), so the default is what CI tests. Nothing here is specific to an
# architecture: apt and pip pick the linux/amd64 or linux/arm64 packages and wheels themselves
# (scripts/check-platforms.sh checks every pinned wheel exists for both).
ARG BASE_IMAGE=debian:bookworm-slim

# A base that already has python3 >= 3.11 (e.g. python:3.11-slim) skips the apt steps.
# checkov:skip=CKV_DOCKER_7: the base is a build argument; its default is a release tag, pin a digest
FROM ${BASE_IMAGE} AS python
# Unpinned on purpose: Debian stable only ships security and bug fixes, and pinned versions
# disappear from the archive when they are superseded. Pin the base image by digest instead.
# hadolint ignore=DL3008
RUN if ! python3 -c "import ssl, json, http.client" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

FROM python AS build
# hadolint ignore=DL3008
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY sidecar ./sidecar
COPY client ./client
COPY wheels ./wheels
# EXTRAS=kubernetes adds the client for the opt-in readiness gate (about +42 MiB). With a
# wheelhouse in wheels/ the install is offline.
ARG EXTRAS=""
RUN python3 -m venv /opt/sidecar \
    && set -- ".${EXTRAS:+[$EXTRAS]}" \
    && if ls wheels/*.whl >/dev/null 2>&1; then \
        set -- --no-index --find-links wheels "marketplace-sidecar${EXTRAS:+[$EXTRAS]}"; fi \
    && /opt/sidecar/bin/pip install --no-cache-dir --disable-pip-version-check \
        -c constraints.txt "$@" \
    && /opt/sidecar/bin/pip uninstall --yes --quiet pip setuptools
# The SBOM of the image's Python environment (CycloneDX JSON, from CycloneDX's own cyclonedx-bom,
# pinned in scripts/sbom-requirements.txt): generated here, in a throw-away virtualenv, from the
# final /opt/sidecar, and shipped at /usr/share/doc/marketplace-sidecar/sbom.cdx.json. Offline with
# the wheels in wheels/sbom/ (scripts/build-image.sh fetches them).
COPY scripts/sbom-requirements.txt ./
RUN python3 -m venv /tmp/sbom \
    && set -- -r sbom-requirements.txt \
    && if ls wheels/sbom/*.whl >/dev/null 2>&1; then \
        set -- --no-index --find-links wheels/sbom "$@"; fi \
    && /tmp/sbom/bin/pip install --no-cache-dir --disable-pip-version-check --quiet "$@" \
    && mkdir -p /opt/sbom \
    && /tmp/sbom/bin/cyclonedx-py environment --output-reproducible --of JSON \
        -o /opt/sbom/sbom.cdx.json /opt/sidecar/bin/python \
    && rm -rf /tmp/sbom

FROM python
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="marketplace-sidecar" \
      org.opencontainers.image.description="AWS Marketplace metering sidecar (RegisterUsage, MeterUsage)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/sidecar /opt/sidecar
COPY --from=build /opt/sbom/sbom.cdx.json /usr/share/doc/marketplace-sidecar/sbom.cdx.json
ENV PATH=/opt/sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The state directory (custom mode's usage store, the hourly verdict) exists in the image, owned by
# the sidecar's user, and is a VOLUME. On Fargate an empty bind volume mounted at a path the image
# does not declare is owned by root with mode 0755, so UID 10001 could not write it; when the image
# declares the same path as a VOLUME, ECS copies the directory (its owner and mode with it) onto the
# volume. AWS: https://docs.aws.amazon.com/AmazonECS/latest/developerguide/bind-mounts.html
# (aws/containers-roadmap#938, #863). Kubernetes mounts its emptyDir over it; the VOLUME changes
# nothing there.
RUN mkdir -p /var/lib/marketplace-sidecar \
    && chown 10001:10001 /var/lib/marketplace-sidecar \
    && chmod 0700 /var/lib/marketplace-sidecar
VOLUME ["/var/lib/marketplace-sidecar"]
USER 10001:10001
EXPOSE 8788
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["marketplace-sidecar", "probe"]
ENTRYPOINT ["marketplace-sidecar"]
CMD ["run"]
