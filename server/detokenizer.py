"""Streaming detokenization and stop strings for one request.

Text is emitted only in complete characters (a multi-byte character split across tokens
waits for its last byte), and the concatenated stream equals the full decode. Stop strings
are found even when split across tokens; text that could still be the start of a stop
string is held back until it cannot be, so a stop string is never streamed by mistake.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers.decoders import DecodeStream


@dataclass(frozen=True)
class StopMatch:
    stop_string: str


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer,  # a transformers tokenizer
        stop: tuple[str, ...] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)  # the `tokenizers` Tokenizer, if fast
        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens) if backend else None
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []  # fallback path: every token so far
        self._decoded_len = 0  # fallback path: chars of the full decode already taken
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # everything decoded so far (cut at a stop string once found)
        self._emitted = 0  # chars of self.text already handed out

    def _decode_next(self, token_id: int) -> str:
        if self._stream is not None:
            return self._stream.step(self._backend, token_id) or ""
        # Fallback for tokenizers without a Rust backend: decode all, keep complete chars.
        self._ids.append(token_id)
        full = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip_special)
        if full.endswith("\ufffd"):
            return ""
        new = full[self._decoded_len :]
        self._decoded_len = len(full)
        return new

    def add_token(self, token_id: int) -> StopMatch | None:
        """Decode one more token; returns the stop string if the text now contains one."""
        new = self._decode_next(token_id)
        if not new:
            return None
        search_from = max(0, len(self.text) - self._hold)
        self.text += new
        for stop in self.stop:
            at = self.text.find(stop, search_from)
            if at != -1:
                self.text = self.text[: at + len(stop)] if self.include_stop else self.text[:at]
                return StopMatch(stop)
        return None

    def take_new_text(self, finished: bool) -> str:
        """Text not yet handed out; while running, the tail that could begin a stop string stays."""
        end = len(self.text) if finished or not self.stop else max(self._emitted, len(self.text) - self._hold)
        new = self.text[self._emitted : end]
        self._emitted = end
        return new
