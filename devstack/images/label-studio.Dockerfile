# Label Studio for tests/containers, standing in for heartexlabs/label-studio (which cannot be
# pulled here): `pip install label-studio` on the suite's Debian base, served like the upstream
# image (port 8080, data in /label-studio/data, an unprivileged user).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ARG LABEL_STUDIO_VERSION=1.23.2
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/label-studio \
    && /opt/label-studio/bin/pip install "label-studio==${LABEL_STUDIO_VERSION}"
ENV PATH=/opt/label-studio/bin:$PATH \
    LABEL_STUDIO_BASE_DATA_DIR=/label-studio/data \
    PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 1001 labelstudio \
    && mkdir -p /label-studio/data \
    && chown labelstudio /label-studio/data
USER labelstudio
WORKDIR /label-studio
EXPOSE 8080
CMD ["label-studio", "start", "--no-browser", "--internal-host", "0.0.0.0", "-p", "8080", "--data-dir", "/label-studio/data"]
