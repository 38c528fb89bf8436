"""Peak resident memory and wall time of every stage of one svdzip command (issue 22: where the memory goes).

    python benchmarks/stage_memory.py --name recommended_qwen05 -- \
        compress --model qwen2.5-0.5b --ratio 0.2 --out /tmp/q05 --overwrite --eval --corpora wiki,austen,code \
        --eval-tokens 16384 --json

Runs the CLI in this process, samples the resident set every 0.2 s in a thread, and charges each sample to the
stage named by the last log line seen (so a stage is "from this log line to the next"). At each stage's peak it
also records where the main thread was (its innermost svdzip frames), so that a stage without log lines of its
own still says which function holds the memory. Writes
`benchmarks/results/<name>.json` (the stages, the command's own JSON summary when it printed one, the whole run's
peak) and `.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import psutil
from common import write_results


class StageSampler(logging.Handler):
    """Peak RSS per stage, a stage being the span after a log record until the next one."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.proc, self.t0 = psutil.Process(), time.time()
        self.main_thread = threading.get_ident()
        self.stages: list[dict[str, Any]] = [{"stage": "start", "start_s": 0.0, "peak_rss": 0}]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        self.stages.append({"stage": f"{record.name}: {record.getMessage()[:160]}",
                            "start_s": round(time.time() - self.t0, 1), "peak_rss": 0})

    def _sample(self) -> None:
        while not self._stop.is_set():
            stage, rss = self.stages[-1], self.proc.memory_info().rss
            if rss > stage["peak_rss"]:
                stage["peak_rss"], stage["where"] = rss, self._where()
            time.sleep(0.2)

    def _where(self, depth: int = 3) -> str:
        """The main thread's innermost svdzip frames, outermost first ("" outside svdzip)."""
        frame = sys._current_frames().get(self.main_thread)
        ours = [f for f in traceback.extract_stack(frame) if "/svdzip/" in f.filename] if frame else []
        return " → ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in ours[-depth:])

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join()
        return self.stages


def markdown(data: dict[str, Any], threshold: float) -> str:
    lines = ["| from (s) | peak RSS GiB | stage (the log line that opened it) | where at its peak |",
             "|---|---|---|---|"]
    for s in data["stages"]:
        if s["peak_rss"] >= threshold * data["peak_rss"]:
            lines.append(f"| {s['start_s']:.0f} | {s['peak_rss'] / 2**30:.2f} | {s['stage'].replace('|', '/')} | "
                         f"{s.get('where', '')} |")
    return (f"### Memory by stage: `svdzip {' '.join(data['argv'])}`\n\nWhole run: peak RSS "
            f"{data['peak_rss'] / 2**30:.2f} GiB, {data['wall_s'] / 60:.1f} min wall. Stages whose peak is at least "
            f"{threshold:.0%} of the run's:\n\n" + "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="results/<name>.json and .md")
    p.add_argument("--threshold", type=float, default=0.6, help="list stages above this fraction of the peak")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the svdzip command line")
    args = p.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    sampler = StageSampler()
    logging.getLogger().addHandler(sampler)
    from svdzip.cli import main as svdzip_main

    out, t0 = io.StringIO(), time.time()
    with contextlib.redirect_stdout(out):
        code = svdzip_main(argv)
    stages = sampler.stop()
    printed = out.getvalue()
    sys.stdout.write(printed)
    try:
        summary = json.loads(printed) if printed.strip() else None
    except json.JSONDecodeError:
        summary = None
    data = {"argv": argv, "exit_code": code, "wall_s": round(time.time() - t0, 1),
            "peak_rss": max(s["peak_rss"] for s in stages), "stages": stages, "summary": summary}
    write_results(args.name, data, markdown(data, args.threshold))


if __name__ == "__main__":
    main()
