# wanfast's serving image: `wanfast serve` on port 8000, the weights mounted at /weights, jobs and videos
# at /data.
# README "Container" has the build and run commands; scripts/container-test.sh builds it from a local Debian
# base and tests it in CI.
#
# The base needs nothing but a glibc Linux with apt-get or an installed python3 (>= 3.10) with venv:
#   default  NVIDIA's CUDA base (Ubuntu 24.04: the driver hook-up, no CUDA libraries); torch comes from PyPI
#            with its own CUDA and cuDNN libraries (the nvidia-* wheels), so a runtime/cudnn base would
#            hold them twice
#   NGC      --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3 keeps the base's own torch (the venv
#            sees the system site-packages, and pip leaves a satisfied torch alone)
#   CPU      any Debian/Ubuntu with --build-arg TORCH_SPEC=torch==2.13.0+cpu plus a wheel folder (below)
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

# The torch requirement for pip; a base whose python already satisfies it downloads nothing.
ARG TORCH_SPEC="torch>=2.4"
# More pip options, e.g. "--find-links /wheels" with `podman build -v $PWD/wheels:/wheels:ro`: local wheels.
ARG PIP_EXTRA=""
# A CA bundle mounted into the build (`-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro`) for
# pip behind an intercepting HTTPS proxy. Build-time only: the image keeps its own CA store.
ARG PIP_CA=""
# The service's user; not 1000, which Ubuntu 24.04 images give to their own "ubuntu" user.
ARG UID=10001

ENV VIRTUAL_ENV=/opt/wanfast \
    PATH=/opt/wanfast/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data/hf

# Python with its headers, and a C compiler: Triton (torch.compile's GPU kernels) builds a small C module
# when it first runs. apt installs them where the base lacks any (CUDA bases lack all three).
RUN inc=$(python3 -c "import ensurepip, sysconfig; print(sysconfig.get_path('include'))" 2>/dev/null); \
    if [ ! -f "$inc/Python.h" ] || ! command -v cc >/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv --system-site-packages /opt/wanfast \
    && useradd --create-home --uid "$UID" --user-group --shell /usr/sbin/nologin wanfast \
    && mkdir -p /weights /data \
    && chown wanfast:wanfast /data

# torch in its own layer: the largest download, and it does not change with wanfast's source.
RUN if [ -n "$PIP_CA" ]; then export PIP_CERT="$PIP_CA"; fi \
    && pip install $PIP_EXTRA "$TORCH_SPEC"

COPY pyproject.toml README.md /src/
COPY wanfast /src/wanfast
# (PIP_CERT, not --cert: the environment reaches the pip that installs the build backend)
RUN if [ -n "$PIP_CA" ]; then export PIP_CERT="$PIP_CA"; fi \
    && pip install $PIP_EXTRA "/src[serve]" \
    && rm -rf /src \
    && wanfast --help >/dev/null

USER wanfast
WORKDIR /home/wanfast
# /weights: a checkpoint folder, mounted read-only. /data: the job database and the videos (keep it across
# restarts: queued jobs survive them), and the Hugging Face cache.
VOLUME ["/weights", "/data"]
EXPOSE 8000
# /health answers 200 once a worker has its model loaded (503 while loading): a 14B model can take minutes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# Arguments after the image name replace CMD: `--ckpt-dir /weights --gpus 0,1`, `--model tiny --device cpu`.
ENTRYPOINT ["wanfast", "serve", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
CMD ["--ckpt-dir", "/weights"]
