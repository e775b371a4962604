# loramux on CPU. Build: docker build -t loramux .   Run: docker run -p 8000:8000 loramux
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
COPY kernels kernels
COPY clients clients
COPY examples/adapters examples/adapters
RUN pip install . && loramux fetch-model

EXPOSE 8000
CMD ["loramux", "serve", "--host", "0.0.0.0", "--port", "8000", "--adapter-dir", "/opt/loramux/examples/adapters"]
