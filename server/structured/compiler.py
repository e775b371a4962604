"""GrammarSpec -> xgrammar CompiledGrammar, once per distinct grammar.

Why xgrammar (bench/grammar_mask_cost.py, SmolLM2-135M's tokenizer, one core): it
precomputes each grammar's token masks at compile time, so a step costs ~5 us per
constrained token against ~60 us for llguidance's on-the-fly masks; compiles take
1-25 ms. Compiles run on a small worker pool, never on the event loop, bounded in input
size and in time, and are cached by the spec's hash (failures too: a bad schema sent again
is refused without recompiling).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import xgrammar

from loramux.server.structured.spec import JSON_SCHEMA, REGEX, STRUCTURAL_TAG, GrammarError, GrammarSpec

logger = logging.getLogger(__name__)

# "[09:19:05] /project/cpp/regex_converter.cc:83: message": the location means nothing to a client.
_NATIVE_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s+\S+:\d+:\s*")


@dataclass(frozen=True)
class GrammarLimits:
    max_spec_bytes: int = 64 << 10  # a schema, regex or tool set larger than this is refused unread
    compile_timeout_s: float = 10.0  # from admission to a compiled grammar (queueing included)
    cache_entries: int = 512  # compiled grammars (and compile errors) kept, least recently used out
    compile_threads: int = 2


class GrammarCompiler:
    """Thread-safe; `compile` is the event loop's entry point, `compile_sync` any thread's."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int],
                 limits: GrammarLimits = GrammarLimits()) -> None:
        self.limits = limits
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._compiler: xgrammar.GrammarCompiler | None = None  # built on first use (~0.3 s)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, xgrammar.CompiledGrammar | GrammarError] = OrderedDict()
        self._pool = ThreadPoolExecutor(limits.compile_threads, thread_name_prefix="loramux-grammar-compile")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def check_size(self, spec: GrammarSpec) -> None:
        size = len(spec.text.encode())
        if size > self.limits.max_spec_bytes:
            raise GrammarError(
                f"{spec.param} is {size} bytes; this server compiles grammars of at most "
                f"{self.limits.max_spec_bytes} bytes", spec.param)

    async def compile(self, spec: GrammarSpec) -> xgrammar.CompiledGrammar:
        """Off the event loop and bounded in time; raises GrammarError naming spec.param."""
        self.check_size(spec)
        cached = self._cached(spec)
        if cached is not None:
            return cached
        future = asyncio.get_running_loop().run_in_executor(self._pool, self.compile_sync, spec)
        try:
            return await asyncio.wait_for(future, self.limits.compile_timeout_s)
        except TimeoutError:
            raise GrammarError(f"{spec.param} could not be compiled within {self.limits.compile_timeout_s:g} s",
                               spec.param) from None

    def compile_sync(self, spec: GrammarSpec) -> xgrammar.CompiledGrammar:
        self.check_size(spec)
        cached = self._cached(spec)
        if cached is not None:
            return cached
        try:
            compiled = self._compile(spec)
        except Exception as exc:  # noqa: BLE001 - the engine's parse errors are the client's
            message = _NATIVE_PREFIX.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else "")
            error = GrammarError(f"{spec.param} cannot be compiled: {message or type(exc).__name__}", spec.param)
            self._store(spec.key, error)
            raise error from None
        self._store(spec.key, compiled)
        return compiled

    def _compile(self, spec: GrammarSpec) -> xgrammar.CompiledGrammar:
        compiler = self._engine()
        if spec.kind == JSON_SCHEMA:
            # Compact JSON: free whitespace lets a small model pad forever.
            return compiler.compile_json_schema(spec.text, any_whitespace=False, strict_mode=spec.strict)
        if spec.kind == REGEX:
            return compiler.compile_regex(spec.text)
        assert spec.kind == STRUCTURAL_TAG
        return compiler.compile_structural_tag(spec.text)

    def _engine(self) -> xgrammar.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                info = xgrammar.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids or None)
                # Our own cache (by spec hash, errors included) replaces xgrammar's.
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def _cached(self, spec: GrammarSpec) -> xgrammar.CompiledGrammar | None:
        with self._lock:
            entry = self._cache.get(spec.key)
            if entry is None:
                return None
            self._cache.move_to_end(spec.key)
        if isinstance(entry, GrammarError):
            raise GrammarError(str(entry).replace(entry.param, spec.param, 1), spec.param)
        return entry

    def _store(self, key: str, entry) -> None:
        with self._lock:
            self._cache[key] = entry
            self._cache.move_to_end(key)
            while len(self._cache) > self.limits.cache_entries:
                self._cache.popitem(last=False)

    @property
    def num_cached(self) -> int:
        with self._lock:
            return len(self._cache)
