# loramux on CPU (the default image). Build: docker build -t loramux .
# Run:   docker run -p 8000:8000 -e LORAMUX_API_KEY -e LORAMUX_ADMIN_API_KEY loramux
# Keys come from the environment (LORAMUX_API_KEY, LORAMUX_ADMIN_API_KEY), never the
# command line; without an admin key, adapter management is refused on 0.0.0.0.
# The CUDA image is Dockerfile.cuda (same sources, --device cuda --dtype bfloat16).
FROM python:3.11-slim

# gcc builds the CPU LoRA kernel once at first start (cached under LORAMUX_HOME).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/loramux
ENV LORAMUX_HOME=/var/lib/loramux PIP_NO_CACHE_DIR=1

# torch first, pinned, from the CPU index: an unpinned torch pulls a CUDA build of several GB.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml setup.py README.md ./
COPY server server
COPY scheduler scheduler
COPY adapter_store adapter_store
COPY loramux_kernels loramux_kernels
COPY clients clients
COPY deploy/ray deploy/ray
COPY examples/adapters examples/adapters
RUN pip install . && loramux fetch-model \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin loramux \
    && mkdir -p /var/lib/loramux-uploads \
    && chown -R loramux:loramux /var/lib/loramux /var/lib/loramux-uploads

USER 10001
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["loramux", "serve", "--host", "0.0.0.0", "--port", "8000", "--adapter-dir", "/opt/loramux/examples/adapters", "--upload-dir", "/var/lib/loramux-uploads"]
