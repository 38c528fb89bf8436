"""`svdzip` under faults: drive the command line into bad situations and tabulate what the user got.

Each case runs the real CLI (`python -m svdzip`, the interpreter running this script) in a fresh work
directory under `--work` and records: the exit status, the error's first line (the exception line when a
traceback was printed), whether a traceback reached the user, how long it took, and what was left behind —
the output directory, temporary siblings (`.<out>.*`), `*.tmp` files in a resume directory, bytes still used
on a full disk. A case passes when the behaviour is what a user of such a tool expects:

* a failure (disk full, corrupted file, bad argument) is exit status != 0 with one `svdzip…: error:` line, no
  traceback, and nothing half-written (no output directory, no temporary sibling, no space still taken);
* SIGKILL during healing, then the same command with the same `--resume-dir`, resumes (the log says from
  which step) and finishes with exit 0, a loadable directory bit-identical to an uninterrupted run's;
* the source model is never modified.

Disk full is real: a small tmpfs is mounted for the output (root with CAP_SYS_ADMIN, as on this machine's
container); without it the case falls back to `RLIMIT_FSIZE` (writes past the limit fail with EFBIG, "File too
large"), and the table says which was used.

    .venv/bin/python benchmarks/faults.py /tmp/sl/smollm2-20

The argument is a compressed directory of SmolLM2-135M (`svdzip compress --model smollm2-135m --ratio 0.2
--allocator uniform --heal none --calib-samples 16 --out /tmp/sl/smollm2-20`); it is only read. Writes
`benchmarks/results/faults.json` and `.md`; exit status 1 when a case fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
DENSE_ALIAS = "smollm2-135m"
DENSE_DIR = Path("~/.cache/svdzip/models/smollm2-135m").expanduser()
# small, fast settings: every case a minute or two on 2 CPU cores
COMPRESS = ["--ratio", "0.2", "--allocator", "uniform", "--heal", "none", "--calib-samples", "16", "--no-plots"]
# plain SVD needs no calibration: the fastest way to reach the save
FAST = ["--method", "svd", "--ratio", "0.2", "--allocator", "uniform", "--heal", "none", "--no-plots"]
HEAL = ["--heal-steps", "4", "--heal-eval-every", "2", "--heal-seq-len", "64", "--heal-samples", "8",
        "--heal-heldout", "2", "--heal-grad-accum", "1", "--heal-lr", "1e-4", "--heal-patience", "10"]
EVAL = ["--corpora", "wiki", "--eval-tokens", "2048", "--seq-len", "256"]
log = logging.getLogger("benchmarks.faults")


@dataclass
class Run:
    argv: list[str]
    rc: int | None
    seconds: float
    stderr: str
    stdout: str
    killed: bool = False

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr

    @property
    def error_line(self) -> str:
        """The `svdzip…: error:` line, else the exception line of a traceback, else the last line of stderr."""
        lines = [ln.rstrip() for ln in self.stderr.splitlines() if ln.strip()]
        for ln in lines:
            if re.match(r"^svdzip( \w+)?: (error|interrupted)", ln):
                return ln
        if self.traceback:
            exc = [ln for ln in lines if not ln.startswith((" ", "\t", "Traceback")) and
                   re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", ln)]
            if exc:
                return exc[-1]
        return lines[-1] if lines else ""

    @property
    def where(self) -> str:
        """The innermost frame of svdzip's own code in a traceback (file:line in function)."""
        frames = re.findall(r'File "([^"]*/svdzip/[^"]*)", line (\d+), in (\w+)', self.stderr)
        frames = [f for f in frames if "/benchmarks/" not in f[0]]
        if not frames:
            return ""
        f, line, fn = frames[-1]
        return f"{f[f.rindex('/svdzip/') + 1:]}:{line} in {fn}"

    @property
    def clear_error(self) -> bool:
        return self.rc not in (0, None) and not self.traceback and bool(
            re.match(r"^svdzip( \w+)?: error: ", self.error_line))


@dataclass
class Row:
    case: str
    situation: str
    command: str
    expected: str
    exit: int | None = None
    error: str = ""
    traceback: bool = False
    where: str = ""
    seconds: float = 0.0
    left_behind: list[str] = field(default_factory=list)
    verdict: str = "FAIL"
    details: str = ""


def cli(args: list[str], cwd: Path, timeout: float, fsize: int | None = None,
        on_start: Callable[[subprocess.Popen], bool] | None = None) -> Run:
    """Run `python -m svdzip ARGS`; `on_start(proc)` may poll and return True once it killed the process."""
    argv = [sys.executable, "-m", "svdzip", *args]

    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    t0 = time.monotonic()
    out, err = cwd / f"stdout-{int(t0 * 1000)}.txt", cwd / f"stderr-{int(t0 * 1000)}.txt"
    with out.open("w") as fo, err.open("w") as fe:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=fo, stderr=fe, preexec_fn=limit, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        killed = False
        try:
            if on_start is not None:
                killed = on_start(proc)
            proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = True
    run = Run(argv, None if killed and on_start is None else proc.returncode, round(time.monotonic() - t0, 1),
              err.read_text(), out.read_text(), killed)
    out.unlink()
    err.unlink()
    log.info("  rc=%s in %.1f s: %s", run.rc, run.seconds, run.error_line[:160])
    return run


def shown(args: list[str]) -> str:
    return "svdzip " + " ".join(args)


def entries(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


def leftovers(parent: Path, before: set[str], allowed: set[str] = frozenset()) -> list[str]:
    """New entries of `parent` (output directories, temporary siblings), and *.tmp files anywhere below them."""
    new = sorted(entries(parent) - before - set(allowed))
    tmp = sorted(str(p.relative_to(parent)) for p in parent.rglob("*") if p.name.endswith(".tmp")
                 or (p.name.startswith(".") and p.parent != parent))
    return new + [t for t in tmp if t not in new]


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@contextmanager
def small_disk(path: Path, size_mib: int):
    """A tmpfs of `size_mib` at `path` (yields ("tmpfs", None)), or ("RLIMIT_FSIZE", bytes) when mounting fails."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        log.info("  cannot mount a tmpfs (%s): RLIMIT_FSIZE instead", r.stderr.strip())
        yield "RLIMIT_FSIZE", size_mib << 20
        return
    try:
        yield "tmpfs", None
    finally:
        subprocess.run(["umount", str(path)], check=False)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def judge_error(row: Row, run: Run, left: list[str], extra_ok: bool = True, why: str = "", note: str = "") -> Row:
    """`why`: the problem when `extra_ok` is False; `note`: shown whatever the verdict."""
    row.exit, row.error, row.traceback, row.seconds, row.left_behind = (run.rc, run.error_line, run.traceback,
                                                                         run.seconds, left)
    row.where = run.where
    problems = []
    if run.rc == 0:
        problems.append("exit 0 where an error or a refusal was expected")
    elif run.rc is None:
        problems.append("killed at the time bound")
    if run.traceback:
        problems.append("a traceback instead of one line")
    elif run.rc not in (0, None) and not run.clear_error:
        problems.append("no `svdzip: error:` line")
    if left:
        problems.append(f"left behind: {', '.join(left)}")
    if not extra_ok:
        problems.append(why)
    row.verdict = "FAIL" if problems else "PASS"
    row.details = "; ".join(problems + ([note] if note else []))
    return row


# ---------------------------------------------------------------- cases


class Cases:
    def __init__(self, work: Path, compressed: Path):
        self.work, self.compressed = work, compressed

    def dir(self, name: str) -> Path:
        d = self.work / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    def copy_compressed(self, dst: Path) -> Path:
        """A private copy (model.safetensors copied, so it can be damaged; the rest hard-linked)."""
        dst.mkdir(parents=True)
        for f in self.compressed.iterdir():
            (shutil.copy2 if f.name in ("model.safetensors", "config.json") else os.link)(f, dst / f.name)
        return dst

    # ------------------------------------------------------------ disk full

    def _output_on_full_disk(self, case: str, what: str, args_for: Callable[[Path, Path], list[str]],
                             expected: str) -> Row:
        """A run whose output goes to a 160 MiB disk: one error, nothing left there, the space given back."""
        w = self.dir(case)
        disk = w / "disk"
        with small_disk(disk, 160) as (how, fsize):
            args = args_for(w, disk)
            row = Row(case, what.format(how=how), shown(args), expected)
            before = entries(disk)
            run = cli(args, w, 600, fsize)
            left = leftovers(disk, before)
            still = used_bytes(disk) if how == "tmpfs" else 0
        return judge_error(row, run, left, still < (1 << 20),
                           f"{still / 2**20:.1f} MiB still used on the full disk after the failure")

    def save_disk_full(self) -> Row:
        return self._output_on_full_disk(
            "save_disk_full", "disk full while saving the compressed model ({how}: 160 MiB for a 432 MiB model)",
            lambda w, disk: ["compress", "--model", DENSE_ALIAS, *FAST, "--out", str(disk / "out")],
            "one-line error, no output directory, no temporary sibling, the space given back")

    def heal_disk_full(self) -> Row:
        """Checkpoints of the heal (factors + Adam moments, ~1 GiB) do not fit: the first checkpoint fails."""
        w = self.dir("heal_disk_full")
        disk = w / "disk"
        with small_disk(disk, 256) as (how, fsize):
            args = ["heal", str(self.compressed), "--out", str(disk / "healed"), "--resume-dir",
                    str(disk / "resume"), *HEAL]
            row = Row("heal_disk_full", f"disk full while healing: a checkpoint in --resume-dir does not fit "
                      f"({how}: 256 MiB)", shown(args), "one-line error, no output directory, no *.tmp in the "
                      "resume directory")
            before = entries(disk)
            run = cli(args, w, 600, fsize)
            left = leftovers(disk, before, allowed={"resume"})
            resume = sorted(str(p.relative_to(disk)) for p in (disk / "resume").rglob("*") if p.is_file())
        return judge_error(row, run, left, note=f"resume directory holds: {', '.join(resume) or 'nothing'}")

    def heal_out_disk_full(self) -> Row:
        """The heal finishes (resume dir on the normal disk) but the healed model does not fit on the output disk."""
        return self._output_on_full_disk(
            "heal_out_disk_full", "disk full while saving the healed model ({how}: 160 MiB)",
            lambda w, disk: ["heal", str(self.compressed), "--out", str(disk / "healed"), "--resume-dir",
                             str(w / "resume"), *HEAL],
            "one-line error, no output directory, no temporary sibling")

    # ------------------------------------------------------------ SIGKILL, resume

    def heal_sigkill_resume(self) -> Row:
        w = self.dir("heal_sigkill_resume")
        args = ["heal", str(self.compressed), "--out", str(w / "healed"), "--resume-dir", str(w / "resume"), *HEAL]
        row = Row("heal_sigkill_resume", "SIGKILL during healing (after the first checkpoint), then the same "
                  "command again", shown(args), "the rerun resumes from the checkpoint, exits 0, and its model is "
                  "bit-identical to an uninterrupted run's; nothing half-written after the kill")
        killed_at: dict[str, Any] = {}

        def kill_after_checkpoint(proc: subprocess.Popen) -> bool:
            deadline = time.monotonic() + 500
            while time.monotonic() < deadline and proc.poll() is None:
                states = list((w / "resume").rglob("state.json"))
                if states:
                    time.sleep(1.0)  # inside the next step, not on the rename
                    killed_at["state"] = json.loads(states[0].read_text()).get("step")
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return True
                time.sleep(0.5)
            return False

        first = cli(args, w, 600, on_start=kill_after_checkpoint)
        if not first.killed:
            row.exit, row.error, row.details = first.rc, first.error_line, "the heal ended before a checkpoint " \
                "appeared: nothing to kill (make it longer)"
            return row
        after_kill = leftovers(w, {"resume"})  # a *.tmp in the resume directory is expected here: SIGKILL
        second = cli(args, w, 600)
        row.exit, row.error, row.traceback, row.seconds = second.rc, second.error_line, second.traceback, \
            first.seconds + second.seconds
        resumed = [ln for ln in second.stderr.splitlines() if re.search(r"resum", ln, re.I)]
        problems = []
        left = leftovers(w, {"resume", "healed"})
        if left:
            problems.append(f"after the rerun: {', '.join(left)}")
        if second.rc != 0:
            problems.append(f"rerun exit {second.rc}: {second.error_line}")
        if not resumed:
            problems.append("the rerun's log never says it resumed")
        ok_dir = (w / "healed" / "model.safetensors").is_file()
        if second.rc == 0 and not ok_dir:
            problems.append("exit 0 but no healed model")
        info = cli(["info", str(w / "healed")], w, 120) if ok_dir else None
        if info is not None and info.rc != 0:
            problems.append(f"`svdzip info` on the result: {info.error_line}")
        # the same heal without a kill: the resumed model must be the same bytes
        ref_dir = self.dir("heal_uninterrupted")
        ref_args = ["heal", str(self.compressed), "--out", str(ref_dir / "healed"), "--resume-dir",
                    str(ref_dir / "resume"), *HEAL]
        ref = cli(ref_args, ref_dir, 600)
        identical = None
        if ok_dir and ref.rc == 0:
            identical = sha256(w / "healed" / "model.safetensors") == sha256(ref_dir / "healed" / "model.safetensors")
            if not identical:
                problems.append("the resumed model differs from the uninterrupted run's")
        elif ref.rc != 0:
            problems.append(f"the uninterrupted reference run failed: {ref.error_line}")
        row.left_behind = left
        row.verdict = "FAIL" if problems else "PASS"
        row.details = "; ".join(problems) or (
            f"killed with a checkpoint at step {killed_at.get('state')} ({first.seconds} s); the rerun logged "
            f"{resumed[0].split(': ', 1)[-1][:140]!r}; healed model bit-identical to an uninterrupted run: "
            f"{identical}" + (f"; right after the kill: {', '.join(after_kill)}" if after_kill else ""))
        shutil.rmtree(ref_dir, ignore_errors=True)
        return row

    # ------------------------------------------------------------ corrupted files at reload

    def _reload(self, case: str, situation: str, damage: Callable[[Path], str], expected: str,
                must_name: str = "") -> Row:
        w = self.dir(case)
        d = self.copy_compressed(w / "model")
        what = damage(d)
        args = ["eval", str(d), *EVAL]
        row = Row(case, f"{situation} ({what})", shown(args), expected)
        run = cli(args, w, 300)
        ppl = re.findall(r"\|\s*wiki[^|]*\|\s*([0-9.eE+naif-]+)", run.stdout)
        named = not must_name or must_name in run.error_line
        judge_error(row, run, [], named, f"the error does not name {must_name}")
        if run.rc == 0:
            row.details += f" (it evaluated the damaged model{': ' + ppl[0] if ppl else ''})"
        return row

    @staticmethod
    def _header(path: Path) -> tuple[int, dict[str, Any]]:
        with path.open("rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            return n, json.loads(f.read(n))

    def corrupt_truncated(self) -> Row:
        def damage(d: Path) -> str:
            f = d / "model.safetensors"
            size = f.stat().st_size
            os.truncate(f, size * 6 // 10)
            return f"model.safetensors truncated from {size} to {size * 6 // 10} bytes"
        return self._reload("corrupt_truncated", "a truncated factor file at reload", damage,
                            "one-line error naming the file")

    def corrupt_header(self) -> Row:
        def damage(d: Path) -> str:
            f = d / "model.safetensors"
            with f.open("r+b") as fh:
                fh.seek(8 + 100)
                fh.write(b"\xff\x00garbage\x00\xff")
            return "11 bytes of the safetensors JSON header overwritten"
        return self._reload("corrupt_header", "a factor file with a corrupted header at reload", damage,
                            "one-line error naming the file")

    def corrupt_bitflip(self) -> Row:
        def damage(d: Path) -> str:
            f = d / "model.safetensors"
            n, header = self._header(f)
            name = "model.layers.3.self_attn.q_proj.left.weight"
            start = 8 + n + header[name]["data_offsets"][0]
            with f.open("r+b") as fh:  # float32 little-endian: byte 3 holds the sign and the top exponent bits
                fh.seek(start + 3)
                b = fh.read(1)[0]
                fh.seek(start + 3)
                fh.write(bytes([b ^ 0x40]))
            return f"one bit flipped: the top exponent bit of {name}[0, 0]"
        return self._reload("corrupt_bitflip", "a bit flip in a factor's data at reload", damage,
                            "an error (a checksum in the manifest), not a silently different model")

    def manifest_rank_mismatch(self) -> Row:
        def damage(d: Path) -> str:
            cfg = json.loads((d / "config.json").read_text())
            mods = cfg["quantization_config"]["modules"]
            name = "model.layers.5.mlp.up_proj"
            mods[name]["rank"] += 7
            (d / "config.json").write_text(json.dumps(cfg, indent=2))
            return f"config.json's manifest says rank {mods[name]['rank']} for {name}, the factors hold " \
                   f"{mods[name]['rank'] - 7}"
        return self._reload("manifest_rank_mismatch", "a manifest whose ranks disagree with the stored factors",
                            damage, "one line naming the module", must_name="model.layers.5.mlp.up_proj")

    def from_pretrained_truncated(self) -> Row:
        """The library route: transformers' from_pretrained after `import svdzip`, on a truncated file."""
        w = self.dir("from_pretrained_truncated")
        d = self.copy_compressed(w / "model")
        os.truncate(d / "model.safetensors", (d / "model.safetensors").stat().st_size // 2)
        code = ("import sys, svdzip, transformers\n"
                "try:\n    transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
                "except Exception as e:\n    print(f'{type(e).__name__}: {str(e).splitlines()[0]}', file=sys.stderr)"
                "\n    sys.exit(3)\n")
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=300)
        row = Row("from_pretrained_truncated", "truncated factor file, loaded with transformers' from_pretrained "
                  "after `import svdzip`", f"AutoModelForCausalLM.from_pretrained('{d}')",
                  "an exception (a library raises; the message names the problem)",
                  exit=r.returncode, error=(r.stderr.strip().splitlines() or [""])[-1], seconds=round(
                      time.monotonic() - t0, 1))
        row.verdict = "PASS" if r.returncode == 3 else "FAIL"
        row.details = "" if r.returncode == 3 else "loaded without an exception"
        return row

    # ------------------------------------------------------------ user mistakes

    def _mistake(self, case: str, situation: str, args: list[str], expected: str = "one-line error, quickly, "
                 "nothing written", timeout: float = 300, setup: Callable[[Path], None] | None = None,
                 check: Callable[[Path, Run], tuple[bool, str]] | None = None) -> Row:
        w = self.dir(case)
        if setup is not None:
            setup(w)
        args = [a.replace("{w}", str(w)) for a in args]
        row = Row(case, situation, shown(args).replace(str(w), "W"), expected)
        before = entries(w)
        run = cli(args, w, timeout)
        ok, why = check(w, run) if check is not None else (True, "")
        return judge_error(row, run, leftovers(w, before), ok, why)

    def out_exists(self) -> Row:
        def setup(w: Path) -> None:
            (w / "out").mkdir()
            (w / "out" / "keep.txt").write_text("user data")

        def check(w: Path, run: Run) -> tuple[bool, str]:
            kept = (w / "out" / "keep.txt").is_file()
            fast = run.seconds < 30
            return kept and fast, ("" if kept else "the existing directory was changed; ") + (
                "" if fast else f"refused only after {run.seconds} s of work (the check should come first)")
        return self._mistake("out_exists", "output directory already exists, no --overwrite",
                             ["compress", "--model", DENSE_ALIAS, *COMPRESS, "--out", "{w}/out"], setup=setup,
                             check=check)

    def out_is_source(self) -> Row:
        digest: dict[str, str] = {}

        def setup(w: Path) -> None:
            shutil.copytree(DENSE_DIR, w / "src")
            digest["before"] = sha256(w / "src" / "model.safetensors")

        def check(w: Path, run: Run) -> tuple[bool, str]:
            f = w / "src" / "model.safetensors"
            same = f.is_file() and sha256(f) == digest["before"]
            return same and run.seconds < 30, ("" if same else "THE SOURCE MODEL WAS OVERWRITTEN; ") + (
                "" if run.seconds < 30 else f"refused only after {run.seconds} s")
        return self._mistake("out_is_source", "--out is the source model's directory, with --overwrite",
                             ["compress", "--model", "{w}/src", *FAST, "--out", "{w}/src", "--overwrite"],
                             "refused before any work; the source model untouched", setup=setup, check=check)

    def heal_out_is_input(self) -> Row:
        digest: dict[str, str] = {}

        def setup(w: Path) -> None:
            self.copy_compressed(w / "in")
            digest["before"] = sha256(w / "in" / "model.safetensors")

        def check(w: Path, run: Run) -> tuple[bool, str]:
            f = w / "in" / "model.safetensors"
            same = f.is_file() and sha256(f) == digest["before"]
            return same and run.seconds < 30, ("" if same else "THE INPUT DIRECTORY WAS REPLACED; ") + (
                "" if run.seconds < 30 else f"refused only after {run.seconds} s")
        return self._mistake("heal_out_is_input", "`svdzip heal DIR --out DIR --overwrite` (the input itself)",
                             ["heal", "{w}/in", "--out", "{w}/in", "--overwrite", *HEAL],
                             "refused before any work; the input untouched", setup=setup, check=check)

    def unknown_method(self) -> Row:
        return self._mistake("unknown_method", "unknown --method",
                             ["compress", "--method", "magic", *COMPRESS, "--out", "{w}/out"])

    def unknown_allocator(self) -> Row:
        return self._mistake("unknown_allocator", "unknown --allocator",
                             ["compress", "--ratio", "0.2", "--allocator", "magic", "--heal", "none", "--out",
                              "{w}/out"])

    def ratio_too_big(self) -> Row:
        return self._mistake("ratio_1.5", "--ratio 1.5 (more than everything removed)",
                             ["compress", "--ratio", "1.5", "--allocator", "uniform", "--heal", "none", "--out",
                              "{w}/out"])

    def ratio_negative(self) -> Row:
        return self._mistake("ratio_negative", "--ratio -0.2",
                             ["compress", "--ratio", "-0.2", "--allocator", "uniform", "--heal", "none", "--out",
                              "{w}/out"])

    def missing_model(self) -> Row:
        return self._mistake("missing_model", "--model is a path that does not exist",
                             ["compress", "--model", "{w}/no-such-model", *COMPRESS, "--out", "{w}/out"])

    def eval_limit_0(self) -> Row:
        return self._mistake("eval_limit_0", "`svdzip eval DIR --tasks piqa --limit 0` (nothing to evaluate)",
                             ["eval", str(self.compressed), "--tasks", "piqa", "--limit", "0", "--corpora", "wiki",
                              "--eval-tokens", "2048", "--seq-len", "256"],
                             "refused with one line (not `nan` and exit 0)")

    def info_dense(self) -> Row:
        return self._mistake("info_dense", "`svdzip info` on a dense (non-svdzip) model directory",
                             ["info", str(DENSE_DIR)], "one-line error saying it is not an svdzip directory")

    def info_missing(self) -> Row:
        return self._mistake("info_missing", "`svdzip info` on a directory that does not exist",
                             ["info", "{w}/nothing-here"])

    def eval_missing(self) -> Row:
        return self._mistake("eval_missing", "`svdzip eval` on a path that does not exist",
                             ["eval", "{w}/nothing-here", *EVAL])


ORDER = ["out_exists", "unknown_method", "unknown_allocator", "ratio_too_big", "ratio_negative", "missing_model",
         "info_dense", "info_missing", "eval_missing", "eval_limit_0", "out_is_source", "heal_out_is_input",
         "corrupt_truncated", "corrupt_header", "corrupt_bitflip", "manifest_rank_mismatch",
         "from_pretrained_truncated", "save_disk_full", "heal_disk_full", "heal_out_disk_full",
         "heal_sigkill_resume"]


def markdown(res: dict[str, Any]) -> str:
    rows = res["rows"]
    fails = [r for r in rows if r["verdict"] != "PASS"]
    lines = ["# svdzip under faults", "",
             f"`{res['command']}` — {res['machine']}; {len(rows)} cases, **{len(rows) - len(fails)} pass, "
             f"{len(fails)} fail**, {res['total_s'] / 60:.1f} min, svdzip at {res['svdzip_commit']}. "
             "Every case runs the real CLI in its own work "
             "directory W; disk full is a real ENOSPC on a small tmpfs mounted for the output. "
             "Failures are analysed in `faults_findings.md`.", "",
             "| case | bad situation | exit | what the user got (first error line) | traceback | left behind | s "
             "| verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = r["error"].replace("|", "\\|")
        if len(err) > 200:
            err = err[:200] + "…"
        verdict = f"**{r['verdict']}**" + (f": {r['details']}" if r["details"] else "")
        tb = f"yes: {r['where']}" if r["traceback"] else "no"
        lines.append(f"| {r['case']} | {r['situation']} | {r['exit']} | {err} | {tb}"
                     f" | {', '.join(r['left_behind']) or '—'} | {r['seconds']} | {verdict.replace('|', '/')} |")
    lines += ["", "Commands (W = the case's work directory):", ""]
    lines += [f"- {r['case']}: `{r['command']}` — expected: {r['expected']}" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("compressed", help="a compressed SmolLM2-135M directory (only read)")
    ap.add_argument("--work", default="/tmp/svdzip-faults", help="scratch directory (emptied)")
    ap.add_argument("--only", default="", help="comma-separated cases (default: all); results then go to --work")
    args = ap.parse_args(argv)
    compressed = Path(args.compressed).resolve()
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cases = Cases(work, compressed)
    names = args.only.split(",") if args.only else ORDER
    t0 = time.monotonic()
    rows = []
    for name in names:
        log.info("case %s", name)
        try:
            rows.append(asdict(getattr(cases, name)()))
        except Exception as exc:  # noqa: BLE001 - a harness problem is a row too, not a lost table
            log.exception("case %s: harness error", name)
            rows.append(asdict(Row(name, "harness error", "", "", verdict="ERROR", details=repr(exc)[:300])))
        r = rows[-1]
        log.info("case %s: %s %s", name, r["verdict"], r["details"][:200])
        shutil.rmtree(work / name, ignore_errors=True)
    repo = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "svdzip"], capture_output=True,
                           text=True)
    res = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
           "svdzip_commit": head.stdout.strip() + (" + uncommitted changes in svdzip/" if dirty.stdout.strip() else ""),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "compressed": str(compressed),
           "total_s": round(time.monotonic() - t0, 1), "rows": rows}
    dest = RESULTS if not args.only else work
    dest.mkdir(exist_ok=True)
    (dest / "faults.json").write_text(json.dumps(res, indent=2))
    (dest / "faults.md").write_text(markdown(res))
    print(markdown(res))
    return 0 if all(r["verdict"] == "PASS" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
