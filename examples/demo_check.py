"""demo-check: do the demo adapters show their behaviour on questions they never saw?

    python -m examples.demo_check [--adapter-dir examples/adapters]

Starts `loramux serve --adapter-dir DIR` on a free 127.0.0.1 port, asks the 20 held-out
questions (examples.questions.held_out_questions) to every adapter and to the base model
through POST /v1/chat/completions (greedy, at most 64 tokens, all 100 requests at once, so
the server batches them across adapters), and counts per behaviour how many answers show
it (examples.behaviours) for the adapter and for the base model. Done when every adapter
shows its behaviour in >= 15 of 20 answers and the base model in <= 3 of 20 (exit 0,
else 1). Writes all answers to build/demo-check.json. Last line:
    demo-check: pirate=A/B french=A/B json=A/B short=A/B      (A adapter, B base, of 20)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loramux.clients import Client
from examples.behaviours import BEHAVIOURS, shows
from examples.questions import held_out_questions

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 64
MIN_ADAPTER, MAX_BASE = 15, 3  # of 20
STARTUP_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(adapter_dir: Path, workdir: Path, threads: int) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "loramux.server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--adapter-dir", str(adapter_dir), "--upload-dir", str(workdir / "uploads"),
             "--threads", str(threads), "--log-level", "warning"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with Client(url, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if client.health():
                    return process, url, log_path
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"the server did not become healthy in {STARTUP_TIMEOUT_S:.0f} s")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def ask_all(url: str, questions: list[str], models: list[str | None]) -> dict[str | None, list[str]]:
    """Every question to every model (None: the base), concurrently; -> model -> answers."""
    jobs = [(model, question) for model in models for question in questions]
    with Client(url, timeout=600.0) as client:
        def ask(job: tuple[str | None, str]) -> str:
            model, question = job
            return client.chat(question, model, max_tokens=MAX_TOKENS, temperature=0.0).text

        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            texts = list(pool.map(ask, jobs))
    answers: dict[str | None, list[str]] = {model: [] for model in models}
    for (model, _), text in zip(jobs, texts):
        answers[model].append(text)
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter-dir", type=Path, default=REPO / "examples" / "adapters")
    parser.add_argument("--url", help="use this running server instead of starting one")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server it starts")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "demo-check.json")
    parser.add_argument("--show", action="store_true", help="print every answer")
    args = parser.parse_args(argv)

    missing = [b for b in BEHAVIOURS if not (args.adapter_dir / b / "adapter_config.json").exists()]
    if missing and not args.url:
        print(f"demo-check: no {', '.join(missing)} adapter in {args.adapter_dir} (run `make demo-adapters`)")
        return 2
    questions = held_out_questions()
    models: list[str | None] = [None, *BEHAVIOURS]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loramux-demo-check-") as tmp:
        process = None
        url = args.url
        if url is None:
            process, url, _ = start_server(args.adapter_dir, Path(tmp), args.threads)
            print(f"server up at {url} ({time.perf_counter() - started:.0f} s)", flush=True)
        try:
            answers = ask_all(url, questions, models)
        finally:
            if process is not None:
                stop_server(process)
    print(f"asked {len(questions)} questions x {len(models)} models in {time.perf_counter() - started:.0f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(
        {"questions": questions, "answers": {m or "base": a for m, a in answers.items()}},
        indent=1, ensure_ascii=False,
    ))
    print(f"Q: {questions[0]}")
    for model in models:
        print(f"  {model or 'base':>6}: {answers[model][0]!r}")
    if args.show:
        for model in models:
            for question, answer in zip(questions, answers[model]):
                print(f"[{model or 'base'}] {question} -> {answer!r}")

    ok, summary = True, []
    for b in BEHAVIOURS:
        hits = sum(shows(b, text) for text in answers[b])
        base = sum(shows(b, text) for text in answers[None])
        good = hits >= MIN_ADAPTER and base <= MAX_BASE
        ok &= good
        print(f"{b:>6}: adapter {hits}/{len(questions)}, base {base}/{len(questions)}  "
              f"{'ok' if good else 'FAIL'} (want >= {MIN_ADAPTER} and <= {MAX_BASE})")
        summary.append(f"{b}={hits}/{base}")
    print(f"answers in {args.out}; counts below are adapter/base, of {len(questions)}")
    print("demo-check: " + " ".join(summary), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
