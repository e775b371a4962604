"""Incremental server-sent-events decoder: feed text as it arrives, get each event's data.

Network chunks do not line up with events: one chunk may hold several events, and one
event may be split over several chunks (even inside "\\r\\n"), so lines are buffered until
a blank line ends the event. Only `data:` fields matter to loramux; comments (":") and
other fields (event, id, retry) are skipped.
"""

from __future__ import annotations


class SSEDecoder:
    def __init__(self) -> None:
        self._buffer = ""
        self._data: list[str] = []

    def feed(self, chunk: str) -> list[str]:
        """-> the data of every event completed by this chunk, in order."""
        self._buffer += chunk
        events: list[str] = []
        while True:
            end = self._line_end()
            if end is None:
                return events
            line, self._buffer = self._buffer[: end[0]], self._buffer[end[1] :]
            event = self._line(line)
            if event is not None:
                events.append(event)

    def flush(self) -> list[str]:
        """At the end of the stream: the last event, if it lacked its closing blank line."""
        events = self.feed("\n") if self._buffer else []
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    def _line_end(self) -> tuple[int, int] | None:
        """(end of the line, start of the next) for the first complete line in the buffer."""
        buf = self._buffer
        lf, cr = buf.find("\n"), buf.find("\r")
        if cr == -1 or (lf != -1 and lf < cr):
            return None if lf == -1 else (lf, lf + 1)
        if cr + 1 == len(buf):
            return None  # a "\n" may follow in the next chunk
        return cr, cr + 2 if buf[cr + 1] == "\n" else cr + 1

    def _line(self, line: str) -> str | None:
        if not line:  # a blank line dispatches the event
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None
