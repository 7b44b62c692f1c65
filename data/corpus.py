"""Where language-modelling text comes from, as HF `datasets` of documents ({"text": str} rows).

Three kinds of source:

- ``hub``: a Hugging Face Hub dataset, e.g. OpenWebText. Without a validation split of its own, its
  "train" split is cut with ``train_test_split(test_size, seed=split_seed, shuffle=True)`` and the test
  part is named "validation" (nanoGPT's and flash-attention's rule: test_size=0.0005, seed=2357).
- ``local``: text files: a file, a folder (every ``*.txt`` below it, recursively, sorted by path) or
  a tarball (.tar, .tar.gz, .tgz, .tar.xz, .tar.bz2; extracted once into the cache). A path may go
  *through* a tarball: ``text-core.tar.xz/tinyshakespeare/input.txt`` is that member of the archive.
  Without explicit validation files, the documents are split with the same rule as the Hub.
- ``stdlib``: the embedded default: this Python's own standard library sources (``*.py`` below
  ``sysconfig.get_paths()["stdlib"]``, sorted by relative path, without test folders and
  site-packages, the longest prefix of that list that fits in ``max_bytes``). Present on every machine.

Files are read as UTF-8 (strict; universal newlines) and cut into documents by ``sample_by``:
"document" (one per file), "line" (one per line, ``str.splitlines``) or "paragraph" (split on blank
lines, ``"\\n\\n"``). Empty or whitespace-only documents are dropped.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import sysconfig
import tarfile
import tempfile
import threading
from pathlib import Path

from datasets import Dataset, DatasetDict, Features, Value

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "data"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")
SAMPLE_BY = ("document", "line", "paragraph")
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
HUB_PROBE_TIMEOUT_S = 5.0


def data_options(local_only: bool = False) -> str:
    """The `data=` choices of configs/data (without Hub sources if local_only), for error messages."""
    names = sorted(
        p.stem for p in CONFIG_DIR.glob("[!_]*.yaml") if not (local_only and "source: hub" in p.read_text())
    )
    return ", ".join(f"data={n}" for n in names) + " (data=stdlib needs no download and no files)"


# ----------------------------------------------------------------------------- local paths and tarballs


def _split_archive(path: Path) -> tuple[Path, Path] | None:
    """(archive, member path inside it) if some prefix of `path` is a tarball, else None."""
    parts = path.parts
    for i in range(1, len(parts) + 1):
        prefix = Path(*parts[:i])
        if prefix.name.endswith(ARCHIVE_SUFFIXES) and prefix.is_file():
            return prefix, Path(*parts[i:]) if i < len(parts) else Path()
    return None


def extract_archive(archive: Path, cache_dir: Path) -> Path:
    """Extract `archive` once into cache_dir/extracted/<name>-<sha256[:16]>/ and return that folder.

    Extraction goes to a temporary folder that is renamed into place, so a killed extraction leaves
    nothing that looks complete.
    """
    h = hashlib.sha256()
    with open(archive, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    dest = cache_dir / "extracted" / f"{archive.name}-{h.hexdigest()[:16]}"
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{archive.name}-"))
    log.info("extracting %s -> %s", archive, dest)
    try:
        with tarfile.open(archive) as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, filter="data")
            else:  # Python without extraction filters
                tf.extractall(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished first
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_path(path: str | os.PathLike, data_root: Path, cache_dir: Path, what: str) -> Path:
    """A local path, relative to `data_root` unless absolute; tarballs on the way are extracted.

    Raises FileNotFoundError naming the path and the fix.
    """
    p = Path(os.path.expanduser(str(path)))
    if not p.is_absolute():
        p = data_root / p
    if p.exists() and not p.name.endswith(ARCHIVE_SUFFIXES):
        return p
    if p.is_file():  # a tarball itself: its extracted folder
        return extract_archive(p, cache_dir)
    split = _split_archive(p)
    if split is None:
        raise FileNotFoundError(_missing_msg(p, what))
    archive, member = split
    inside = extract_archive(archive, cache_dir) / member
    if not inside.exists():
        raise FileNotFoundError(f"{what}: {archive} has no member {member}. " + _missing_msg(p, what))
    return inside


def _missing_msg(p: Path, what: str) -> str:
    return (
        f"{what}: {p} does not exist. Fix: put the data there (a file, a folder of .txt files or a "
        f"tarball), set FLASHREPRO_DATA to the folder that holds it (relative paths are under "
        f"data.data_root), or pass an absolute path; or choose another source: {data_options()}."
    )


def check_path(path: str | os.PathLike, data_root: Path) -> None:
    """Cheap existence check (no extraction) so a wrong path fails before any work."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_absolute():
        p = data_root / p
    if not p.exists() and _split_archive(p) is None:
        raise FileNotFoundError(_missing_msg(p, "data"))


def text_files(root: Path) -> list[Path]:
    """`root` itself if it is a file, else every *.txt below it (recursive), sorted by path."""
    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{root} holds no .txt files. Fix: point data.path at a text file or folder.")
    return files


def content_sha256(files: list[tuple[str, Path]]) -> str:
    """sha256 over (name, size, bytes) of each (name, path), in order; also checks UTF-8."""
    h = hashlib.sha256()
    for name, path in files:
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not valid UTF-8 ({e}). Fix: re-encode it as UTF-8.") from None
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def named_files(roots: list[Path]) -> list[tuple[str, Path]]:
    """(name, path) of the text files under each root; names are relative to their root."""
    out = []
    for i, root in enumerate(roots):
        for f in text_files(root):
            rel = f.name if root.is_file() else f.relative_to(root).as_posix()
            out.append((f"{i}/{rel}", f))
    return out


# ----------------------------------------------------------------------------- the embedded stdlib corpus


def stdlib_files(max_bytes: int) -> tuple[list[tuple[str, Path]], int]:
    """The stdlib corpus: (relative name, path) of each file, and the total bytes.

    The *.py files below sysconfig's stdlib folder, sorted by relative path, skipping folders named
    test/tests/idle_test/site-packages/dist-packages/__pycache__ and files that are not UTF-8; the
    longest prefix of that list whose total size is <= max_bytes.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        for fn in filenames:
            if fn.endswith(".py"):
                p = Path(dirpath) / fn
                found.append((p.relative_to(root).as_posix(), p))
    found.sort()
    chosen, total = [], 0
    for rel, p in found:
        size = p.stat().st_size
        if total + size > max_bytes:
            break
        try:
            p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        chosen.append((rel, p))
        total += size
    if not chosen:
        raise FileNotFoundError(f"no stdlib sources found under {root} (max_bytes={max_bytes}).")
    return chosen, total


# ----------------------------------------------------------------------------- documents


def _documents(files: list[str], sample_by: str):
    for f in files:
        text = Path(f).read_text(encoding="utf-8")
        if sample_by == "document":
            docs = [text]
        elif sample_by == "line":
            docs = text.splitlines()
        else:
            docs = text.split("\n\n")
        for d in docs:
            if d.strip():
                yield {"text": d}


def local_documents(files: list[Path], sample_by: str, fingerprint: str, hf_cache: Path) -> Dataset:
    """The documents of `files` (in order) as a Dataset with one "text" column."""
    return Dataset.from_generator(
        _documents,
        gen_kwargs={"files": [str(f) for f in files], "sample_by": sample_by},
        features=Features({"text": Value("string")}),
        cache_dir=str(hf_cache),
        fingerprint=f"{fingerprint}-{sample_by}",
    )


def split_train_validation(ds: Dataset, test_size: float | int, seed: int, what: str) -> DatasetDict:
    """nanoGPT's split: train_test_split(test_size, seed, shuffle=True), "test" renamed "validation"."""
    n_test = test_size if isinstance(test_size, int) else math.ceil(test_size * len(ds))
    if len(ds) < 2 or n_test >= len(ds):
        raise ValueError(
            f"{what} has {len(ds)} document(s): too few to split off test_size={test_size} for validation. "
            "Fix: use data.sample_by=line or paragraph (more, shorter documents), or give data.val_path."
        )
    split = ds.train_test_split(test_size=test_size, seed=seed, shuffle=True)
    return DatasetDict(train=split["train"], validation=split["test"])


# ----------------------------------------------------------------------------- the Hugging Face Hub


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _local_hint() -> str:
    return (
        f"Choose a local source instead: {data_options(local_only=True)}; or data.source=local "
        "data.path=/your/text. If the dataset is already in your Hugging Face cache, set HF_HUB_OFFLINE=1."
    )


def ensure_hub_reachable(what: str, hint: str | None = None) -> None:
    """Raise ConnectionError within seconds if the Hub cannot be reached (no retry loop)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    hint = hint or _local_hint()
    if _hub_offline():
        raise ConnectionError(
            f"{what} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. {hint}"
        )
    result: list[BaseException | None] = []

    def probe():
        try:
            get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
            result.append(None)
        except Exception as e:  # any transport error means "unreachable"
            result.append(e)

    t = threading.Thread(target=probe, daemon=True)  # a thread bounds DNS lookups too
    t.start()
    t.join(HUB_PROBE_TIMEOUT_S + 1)
    err = result[0] if result else TimeoutError(f"no answer in {HUB_PROBE_TIMEOUT_S + 1:.0f} s")
    if err is not None:
        raise ConnectionError(
            f"cannot download {what}: the Hugging Face Hub ({constants.ENDPOINT}) is unreachable "
            f"({type(err).__name__}: {err}). {hint}"
        )


def hub_file(repo_id: str, filename: str, what: str, hint: str | None = None) -> str:
    """Local path of a Hub file: the HF cache if it is there (no network), else a download."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return cached
    ensure_hub_reachable(what, hint)
    return hf_hub_download(repo_id, filename)


def hub_documents(name: str, config: str | None, test_size: float | int, seed: int) -> DatasetDict:
    """The Hub dataset's "train" and "validation" splits (validation cut from train if absent)."""
    from datasets import load_dataset

    what = f"dataset {name!r}" + (f" (config {config!r})" if config else "")
    if not _hub_offline():
        ensure_hub_reachable(what)
    try:
        dsd = load_dataset(name, config)
    except ConnectionError as e:
        raise ConnectionError(
            f"cannot load {what} from the Hub or the local HF cache ({e}). {_local_hint()}"
        ) from e
    if "text" not in dsd["train"].column_names:
        raise ValueError(f"{what} has no 'text' column (columns: {dsd['train'].column_names}).")
    if "validation" in dsd:
        return DatasetDict(train=dsd["train"], validation=dsd["validation"])
    return split_train_validation(dsd["train"], test_size, seed, what)
