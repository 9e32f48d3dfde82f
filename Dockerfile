# syntax=docker/dockerfile:1
# marketplace-sidecar image. Runs as UID 10001, works with a read-only root filesystem, and
# carries no compiler, pip cache or source tree. BASE_IMAGE must provide python3 (>= 3.11) with
# the venv module; CI builds it on a Debian bookworm root filesystem.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY sidecar ./sidecar
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

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="marketplace-sidecar" \
      org.opencontainers.image.description="AWS Marketplace RegisterUsage entitlement sidecar" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/sidecar /opt/sidecar
ENV PATH=/opt/sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8788
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["marketplace-sidecar", "probe"]
ENTRYPOINT ["marketplace-sidecar"]
CMD ["run"]
