"""``cps-fast prepare``: the presets' data folders, written from the official archives.

The output is exactly the prepared layout of the official CPS code (TorchSemiSeg):

* ``voc`` (``DATA/pascal_voc``): ``train_aug/{image,label}/<id>.{jpg,png}``,
  ``val/{image,label}/<id>.{jpg,png}``, ``train_aug.txt`` and ``val.txt`` (one id a line).
  train_aug = (SBD train + SBD val + VOC seg train) - VOC seg val, 10582 ids; val = VOC's
  seg val, 1449 ids. VOC's own labels (palette PNGs, read as indices) win over SBD's
  (``GTcls.Segmentation`` of ``dataset/cls/<id>.mat``); JPEGs are copied byte for byte,
  from VOC's ``JPEGImages`` or, only where VOC lacks one, SBD's ``dataset/img``.
* ``cityscapes`` (``DATA/city``): ``images/{train,val}/<stem>.png`` (copied byte for byte),
  ``segmentation/{train,val}/<stem>_gtFine.png`` (train ids, 255 = ignore: mapped once here
  from ``*_gtFine_labelIds.png``, or ``*_gtFine_labelTrainIds.png`` used as is) and
  ``config_new/{train,val}.txt`` (``/images/train/<stem>.png<TAB>/segmentation/train/<stem>_gtFine.png``).

Labels are 8-bit grayscale ("L") PNGs of class indices. Sources are read in place: tar
archives with :mod:`tarfile` (one pass in archive order; a plain ``.tar`` is indexed by its
headers first, a ``.tgz`` is streamed), zips with :mod:`zipfile`, or the extracted folders.
Decoding and encoding run on a thread pool (PIL's codecs and zlib release the GIL).

Resuming is safe only for files this tool wrote for the same sources, so ``--out`` is claimed
first: ``.cps-fast-prepare-started.json`` (the stamp: dataset and sources) is written before any
other file. A source is identified by path, size and mtime (an archive) or by path and a
fingerprint of the files read from it (a folder: their count, total size and a digest of every
name, size and mtime). A stamp or marker naming other sources, or files in ``--out`` with
neither, is refused with :class:`DataError`; ``force=True`` (``--force``) deletes the files of
the folders it writes and writes everything anew.

Every file is written under a temporary name in its folder, fsynced and renamed into place, so
neither an interruption nor a power loss leaves a partial file under a final name; a rerun
skips the files already done (a copy of the source's size ending in its format's trailer, JPEG
``FFD9`` or PNG ``IEND``; a label PNG ending in IEND). The lists are written after every file is
checked, and ``.cps-fast-prepare.json`` (sources and counts) last: its presence means the
folder is complete.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import io
import json
import logging
import os
import re
import sys
import tarfile
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from .common import CITYSCAPES_ID_TO_TRAINID, DataError, _image_size, check_label

__all__ = ["prepare_voc", "prepare_cityscapes", "main", "MARKER", "STAMP"]

log = logging.getLogger("cps_fast.data")

MARKER = ".cps-fast-prepare.json"  # written last: the folder is complete
STAMP = ".cps-fast-prepare-started.json"  # written first: the folder is this run's (dataset, sources)
MISSING = ".cps-fast-prepare-missing.txt"  # every missing id, when too many to name in the error
MARKER_VERSION = 2  # of the marker and the stamp; 2: sources carry folder fingerprints
# what the official archives give; smaller counts are fine for subsets and test fixtures
VOC_COUNTS = {"train_aug": 10582, "val": 1449}
CITYSCAPES_COUNTS = {"train": 2975, "val": 500}
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last 12 bytes of every complete PNG
_TRAILERS = {".jpg": b"\xff\xd9", ".png": _PNG_END}  # what a complete copy ends in (JPEG EOI, PNG IEND)


# --------------------------------------------------------------------------- progress

class _Progress:
    """A one-line progress bar on a TTY; otherwise only a start and an end line."""

    def __init__(self, title: str, stream=None, total: Optional[int] = None):
        self.title = title
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total = total
        self.done = 0
        self.present = 0
        self._t0 = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()

    def line(self, msg: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
        print(f"{self.title}: {msg}", file=self.stream, flush=True)

    def set_total(self, total: int) -> None:
        with self._lock:
            self.total = total

    def add(self, n: int = 1, present: bool = False) -> None:
        with self._lock:
            self.done += n
            if present:
                self.present += n
            now = time.monotonic()
            if self.tty and now - self._last >= 0.1:
                self._last = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self._t0, 1e-9)
        if self.total:
            pct = min(100, 100 * self.done // max(self.total, 1))
            text = f"{self.done}/{self.total} files ({pct}%) {rate:.0f}/s"
        else:
            text = f"{self.done} files {rate:.0f}/s"
        self.stream.write(f"\r\x1b[K{self.title}: {text}")
        self.stream.flush()

    def finish(self, msg: str) -> None:
        elapsed = time.monotonic() - self._t0
        if self.tty:
            self._draw(time.monotonic())
            self.stream.write("\n")
        print(f"{self.title}: {self.done} files in {elapsed:.1f} s ({self.done / max(elapsed, 1e-9):.0f}/s, "
              f"{self.present} already present); {msg}", file=self.stream, flush=True)


# --------------------------------------------------------------------------- files

def _atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary name next to ``path``, fsync it and rename it into place.

    The fsync makes the data durable before the name appears: without it a power loss can leave
    a file of the right size full of zeros under its final name, which a resume would keep.
    """
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}.{uuid.uuid4().hex[:12]}.part")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise DataError(f"cannot write {path}: {e}") from e
        raise


def _clean_partials(dirs: Iterable[str]) -> None:
    """Remove the temporary files an interrupted run left behind (``.<name>.<hex>.part``)."""
    for d in dirs:
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if name.startswith(".") and name.endswith(".part"):
                os.remove(os.path.join(d, name))


def _copy_done(path: str, size: int) -> bool:
    """A copy counts as done when it has the source's size and ends in its format's trailer.

    The trailer check (JPEG ``FFD9``, PNG ``IEND``) costs one small read and rejects a file of
    the right size whose tail is zeros; a source without the usual trailer is simply copied again.
    """
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != size:
                return False
            trailer = _TRAILERS.get(os.path.splitext(path)[1].lower())
            if trailer is None:
                return True
            if size < len(trailer):
                return False
            f.seek(-len(trailer), os.SEEK_END)
            return f.read() == trailer
    except OSError:
        return False


def _png_done(path: str) -> bool:
    """A label PNG counts as done when it ends in its IEND chunk (truncated files do not)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < 57:  # signature + IHDR + an IDAT + IEND
                return False
            f.seek(-len(_PNG_END), os.SEEK_END)
            return f.read() == _PNG_END
    except OSError:
        return False


def _encode_png(label: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a uint8 HxW class-index map."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _decode_index_png(data: bytes, where: str) -> tuple[np.ndarray, str]:
    """(HxW uint8 indices, PIL mode) of a palette or grayscale label PNG: indices, never colours."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = im.mode
            if mode not in ("P", "L"):
                raise DataError(f"label {where} has PIL mode {mode!r}; expected a palette ('P') or "
                                "grayscale ('L') PNG of class indices")
            arr = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"label {where} is unreadable or corrupt: {e}") from e
    return arr, mode


def _struct_field(obj, name: str, where: str):
    """Field ``name`` of a MATLAB struct as any :func:`scipy.io.loadmat` form returns it.

    ``struct_as_record=False`` gives ``mat_struct`` objects, the default a record ndarray,
    ``squeeze_me=False`` wraps either in a 1x1 object array, ``simplify_cells=True`` a dict.
    """
    for _ in range(8):
        if isinstance(obj, dict):
            if name not in obj:
                raise DataError(f"SBD label {where}: struct GTcls has no field {name} (fields: {sorted(obj)})")
            obj = obj[name]
            break
        if hasattr(obj, "_fieldnames"):
            if name not in obj._fieldnames:
                raise DataError(f"SBD label {where}: struct GTcls has no field {name} "
                                f"(fields: {list(obj._fieldnames)})")
            obj = getattr(obj, name)
            break
        if isinstance(obj, np.ndarray) and obj.dtype.names is not None:
            if name not in obj.dtype.names:
                raise DataError(f"SBD label {where}: struct GTcls has no field {name} "
                                f"(fields: {list(obj.dtype.names)})")
            if obj.size != 1:
                raise DataError(f"SBD label {where}: GTcls is a {obj.shape} struct array, expected one struct")
            obj = obj.reshape(-1)[0][name]
            break
        if isinstance(obj, np.ndarray) and obj.dtype == object and obj.size == 1:
            obj = obj.reshape(-1)[0]
            continue
        raise DataError(f"SBD label {where}: GTcls is a {type(obj).__name__}, expected a MATLAB struct")
    else:
        raise DataError(f"SBD label {where}: GTcls is nested too deeply to be a MATLAB struct")
    while isinstance(obj, np.ndarray) and obj.dtype == object and obj.size == 1:
        obj = obj.reshape(-1)[0]
    return obj


def _read_sbd_mat(data: bytes, where: str) -> np.ndarray:
    """The HxW class map ``GTcls.Segmentation`` of an SBD ``cls/<id>.mat`` (MATLAB v5)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(io.BytesIO(data), struct_as_record=False, squeeze_me=False, variable_names=["GTcls"])
    except Exception as e:
        raise DataError(f"SBD label {where} is not a readable MATLAB file: {e}") from e
    if "GTcls" not in mat:
        raise DataError(f"SBD label {where} has no variable GTcls (SBD's cls/*.mat hold the struct GTcls)")
    seg = np.asarray(_struct_field(mat["GTcls"], "Segmentation", where))
    if seg.ndim != 2 or seg.dtype.kind not in "uib" or seg.size == 0:
        raise DataError(f"SBD label {where}: GTcls.Segmentation is a {seg.dtype} array of shape {seg.shape}; "
                        "expected an HxW integer class map")
    if seg.size and (int(seg.min()) < 0 or int(seg.max()) > 255):
        raise DataError(f"SBD label {where}: GTcls.Segmentation has values {int(seg.min())}..{int(seg.max())}, "
                        "outside 0..255")
    return np.ascontiguousarray(seg, dtype=np.uint8)


def _parse_ids(data: bytes, where: str) -> list[str]:
    """The ids of a VOC/SBD split list (one a line), in file order, without duplicates."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"list {where} is not text: {e}") from e
    ids, seen = [], set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if len(line.split()) != 1:
            raise DataError(f"list {where} line {lineno} is {line!r}; expected one image id")
        if line not in seen:
            seen.add(line)
            ids.append(line)
    if not ids:
        raise DataError(f"list {where} is empty")
    return ids


# --------------------------------------------------------------------------- sources

@dataclass
class _Member:
    """One wanted file of a source: its kind and key as ``classify`` named them."""

    kind: str
    key: object
    name: str  # path inside the archive, or relative to the folder
    size: int
    where: str  # for messages: archive:member or the file's path
    reader: Callable[[], bytes] = field(repr=False, default=None)
    deferrable: bool = False  # True: safe to read from a worker thread, at any time
    data: Optional[bytes] = field(repr=False, default=None)

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        try:
            return self.reader()
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot read {self.where}: {e}") from e


Classify = Callable[[str], Optional[tuple[str, object]]]


def _norm(name: str) -> str:
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


class _TarSource:
    """A tar archive (any compression tarfile reads), read in archive order without unpacking."""

    def __init__(self, path: str):
        self.path = path
        self.display = os.path.basename(path)
        self._tf = None

    def members(self, classify: Classify, keep: Sequence[str] = ()) -> list[_Member]:
        """Index the wanted members by their headers (cheap for a plain .tar: data is seeked over).

        Members of a kind in ``keep`` are read during the scan, so small lists cost no extra pass.
        Read the others in the returned (archive) order: a compressed archive then decompresses
        once more, an uncompressed one only reads what is asked for.
        """
        try:
            self._tf = tf = tarfile.open(self.path, "r:*")
            out = []
            for ti in tf:
                m = self._member(ti, classify, lambda ti=ti: tf.extractfile(ti).read())
                if m is not None:
                    if m.kind in keep:
                        m.data = m.read()
                    out.append(m)
            return out
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"archive {self.path} is not a readable tar archive: {e}") from e

    def stream(self, classify: Classify, keep: Sequence[str] = ()) -> Iterator[_Member]:
        """Yield the wanted members in one sequential pass; read each before asking for the next."""
        try:
            with tarfile.open(self.path, "r|*", bufsize=1 << 20) as tf:
                for ti in tf:
                    m = self._member(ti, classify, lambda ti=ti: tf.extractfile(ti).read())
                    if m is not None:
                        if m.kind in keep:
                            m.data = m.read()
                        yield m
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"archive {self.path} is not a readable tar archive (or is truncated): {e}") from e

    def _member(self, ti, classify, reader) -> Optional[_Member]:
        if not ti.isfile():
            return None
        name = _norm(ti.name)
        c = classify(name)
        if c is None:
            return None
        return _Member(c[0], c[1], name, ti.size, f"{self.display}:{name}", reader, deferrable=False)

    def identity(self, classify: Classify) -> dict:
        return _file_identity(self.path)

    def close(self) -> None:
        if self._tf is not None:
            self._tf.close()
            self._tf = None


class _ZipSource:
    """A zip archive: random access, members read from worker threads (ZipFile allows that)."""

    def __init__(self, path: str):
        self.path = path
        self.display = os.path.basename(path)
        try:
            self._zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"archive {path} is not a readable zip archive: {e}") from e

    def members(self, classify: Classify, keep: Sequence[str] = ()) -> list[_Member]:
        out = []
        for info in sorted(self._zf.infolist(), key=lambda i: i.header_offset):
            if info.is_dir():
                continue
            name = _norm(info.filename)
            c = classify(name)
            if c is None:
                continue
            m = _Member(c[0], c[1], name, info.file_size, f"{self.display}:{name}",
                        lambda info=info: self._zf.read(info), deferrable=True)
            if m.kind in keep:
                m.data = m.read()
            out.append(m)
        return out

    stream = members

    def identity(self, classify: Classify) -> dict:
        return _file_identity(self.path)

    def close(self) -> None:
        self._zf.close()


class _FolderSource:
    """An extracted folder; member names are ``prefix`` + the path below ``base``."""

    def __init__(self, base: str, prefix: str, subdirs: Sequence[str]):
        self.path = base
        self.display = base
        self.prefix = prefix
        self.subdirs = subdirs
        self._scans: dict = {}

    def _scan(self, classify: Classify) -> list[tuple]:
        """``(name, path, size, mtime_ns, (kind, key))`` of the wanted files, walked once per ``classify``."""
        got = self._scans.get(classify)
        if got is not None:
            return got
        got = []
        for sub in self.subdirs:
            top = os.path.join(self.path, sub)
            if os.path.isfile(top):
                walk = [(os.path.dirname(top), [], [os.path.basename(top)])]
            else:
                walk = os.walk(top)
            for dirpath, dirnames, filenames in walk:
                dirnames.sort()
                for fn in sorted(filenames):
                    path = os.path.join(dirpath, fn)
                    name = self.prefix + os.path.relpath(path, self.path).replace(os.sep, "/")
                    c = classify(name)
                    if c is None:
                        continue
                    try:
                        st = os.stat(path)
                    except OSError as e:
                        raise DataError(f"cannot read {path}: {e}") from e
                    got.append((name, path, st.st_size, st.st_mtime_ns, c))
        self._scans[classify] = got
        return got

    def identity(self, classify: Classify) -> dict:
        """The folder and a fingerprint of the files read from it: their count, total size and a
        digest of every (name, size, mtime). An added, removed or renamed file, or an edit that
        changes a file's size or mtime, changes it; the files' contents are not read."""
        h, total = hashlib.sha256(), 0
        scan = self._scan(classify)
        for name, _, size, mtime_ns, _ in scan:
            h.update(f"{name}\0{size}\0{mtime_ns}\n".encode("utf-8", "surrogateescape"))
            total += size
        return {"path": os.path.abspath(self.path), "files": len(scan), "bytes": total,
                "listing_sha256": h.hexdigest()}

    def members(self, classify: Classify, keep: Sequence[str] = ()) -> list[_Member]:
        out = []
        for name, path, size, _, (kind, key) in self._scan(classify):
            m = _Member(kind, key, name, size, path, lambda path=path: _read_file(path), deferrable=True)
            if kind in keep:
                m.data = m.read()
            out.append(m)
        return out

    stream = members

    def close(self) -> None:
        pass


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _archive_kind(path: str) -> Optional[str]:
    if not os.path.isfile(path):
        return None
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except OSError:
        pass
    return None


def _require_path(path: str, what: str) -> str:
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise DataError(f"{what} path {path} does not exist")
    return path


def _open_voc(path: str):
    path = _require_path(path, "--voc")
    if os.path.isdir(path):
        for cand in (os.path.join(path, "VOCdevkit", "VOC2012"), os.path.join(path, "VOC2012"), path):
            if os.path.isdir(os.path.join(cand, "JPEGImages")) or os.path.isdir(os.path.join(cand, "ImageSets")):
                return _FolderSource(cand, "VOC2012/", ["JPEGImages", "SegmentationClass",
                                                        os.path.join("ImageSets", "Segmentation")])
        raise DataError(
            f"--voc folder {path} holds no VOC 2012 devkit: looked for {path}/VOCdevkit/VOC2012/, {path}/VOC2012/ "
            f"and {path}/ itself holding JPEGImages/, SegmentationClass/, ImageSets/Segmentation/{{train,val}}.txt "
            "(or pass VOCtrainval_11-May-2012.tar)")
    if _archive_kind(path) != "tar":
        raise DataError(f"--voc {path} is neither a folder nor a tar archive "
                        "(expected VOCtrainval_11-May-2012.tar or its extracted folder)")
    return _TarSource(path)


def _open_sbd(path: str):
    path = _require_path(path, "--sbd")
    if os.path.isdir(path):
        for cand in (os.path.join(path, "benchmark_RELEASE", "dataset"), os.path.join(path, "dataset"), path):
            if os.path.isdir(os.path.join(cand, "cls")):
                return _FolderSource(cand, "dataset/", ["cls", "img", "train.txt", "val.txt"])
        raise DataError(
            f"--sbd folder {path} holds no SBD dataset: looked for {path}/benchmark_RELEASE/dataset/, "
            f"{path}/dataset/ and {path}/ itself holding cls/<id>.mat, img/<id>.jpg and train.txt, val.txt "
            "(or pass benchmark.tgz)")
    if _archive_kind(path) != "tar":
        raise DataError(f"--sbd {path} is neither a folder nor a tar archive "
                        "(expected SBD's benchmark.tgz or its extracted folder)")
    return _TarSource(path)


_VOC_RE = re.compile(r"(?:^|/)VOC2012/(?:JPEGImages/(?P<jpg>[^/]+)\.jpg|SegmentationClass/(?P<seg>[^/]+)\.png"
                     r"|ImageSets/Segmentation/(?P<list>train|val)\.txt)$")
_SBD_RE = re.compile(r"(?:^|/)dataset/(?:cls/(?P<mat>[^/]+)\.mat|img/(?P<img>[^/]+)\.jpg"
                     r"|(?P<list>train|val)\.txt)$")
_CITY_RE = re.compile(r"(?:^|/)(?:leftImg8bit/(?P<isplit>train|val)/[^/]+/(?P<istem>[^/]+)_leftImg8bit\.png"
                      r"|gtFine/(?P<lsplit>train|val)/[^/]+/(?P<lstem>[^/]+)_gtFine_(?P<kind>labelTrainIds|labelIds)"
                      r"\.png)$")


def _classify_re(rx: re.Pattern) -> Classify:
    def classify(name: str):
        m = rx.search(name)
        if m is None:
            return None
        kind, key = next((k, v) for k, v in m.groupdict().items() if v is not None)
        return kind, key
    return classify


def _classify_city(name: str):
    m = _CITY_RE.search(name)
    if m is None:
        return None
    if m["isplit"]:
        return "image", (m["isplit"], m["istem"])
    return m["kind"], (m["lsplit"], m["lstem"])


_classify_voc = _classify_re(_VOC_RE)
_classify_sbd = _classify_re(_SBD_RE)


def _file_identity(path: str) -> dict:
    """An archive's identity in the stamp and marker: path, size and mtime."""
    p = os.path.abspath(path)
    st = os.stat(p)
    return {"path": p, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# --------------------------------------------------------------------------- worker pool

class _Pool:
    """A bounded thread pool: submit() blocks when 4 x workers tasks are in flight, and
    raises the first error a task raised (later submissions stop; pending ones are cancelled)."""

    def __init__(self, workers: int, progress: _Progress):
        self._ex = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cps-fast-prepare")
        self._slots = threading.BoundedSemaphore(4 * workers)
        self._progress = progress
        self._pending: set = set()
        self._error: Optional[BaseException] = None
        self._lock = threading.Lock()

    def submit(self, fn, *args) -> None:
        self.check()
        self._slots.acquire()
        try:
            fut = self._ex.submit(fn, *args)
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._pending.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut) -> None:
        with self._lock:
            self._pending.discard(fut)
        self._slots.release()
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            with self._lock:
                if self._error is None:
                    self._error = exc
        else:
            self._progress.add()

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def drain(self) -> None:
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                break
            cf.wait(pending)
        self.check()

    def map(self, fn, items) -> list:
        self.check()
        return list(self._ex.map(fn, items))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._ex.shutdown(wait=True, cancel_futures=True)


def _workers(n: Optional[int]) -> int:
    if n is None:
        return min(8, os.cpu_count() or 1)
    if int(n) < 1:
        raise DataError(f"--workers must be at least 1, got {n}")
    return int(n)


# --------------------------------------------------------------------------- tasks

def _copy_task(m: _Member, data: Optional[bytes], dest: str) -> None:
    data = m.read() if data is None else data
    if len(data) != m.size:
        raise DataError(f"{m.where}: read {len(data)} bytes, the archive says {m.size}")
    _atomic_write(dest, data)


def _voc_label_task(m: _Member, data: Optional[bytes], dest: str) -> None:
    label, _ = _decode_index_png(m.read() if data is None else data, m.where)
    check_label(label, 21, f"{m.key} ({m.where})")
    _atomic_write(dest, _encode_png(label))


def _sbd_label_task(m: _Member, data: Optional[bytes], dest: str) -> None:
    label = _read_sbd_mat(m.read() if data is None else data, m.where)
    check_label(label, 21, f"{m.key} ({m.where})")
    _atomic_write(dest, _encode_png(label))


def _city_label_task(m: _Member, data: Optional[bytes], dest: str) -> None:
    data = m.read() if data is None else data
    label, mode = _decode_index_png(data, m.where)
    if m.kind == "labelIds":
        label = CITYSCAPES_ID_TO_TRAINID[label]
        out = _encode_png(label)
    else:  # labelTrainIds: used as is (the bytes themselves when already grayscale)
        out = data if mode == "L" else _encode_png(label)
    check_label(label, 19, f"{m.key[1]} ({m.where})")
    _atomic_write(dest, out)


# --------------------------------------------------------------------------- shared steps

@dataclass
class _Item:
    split: str
    ident: str
    image: str  # output paths
    label: str
    image_src: Optional[str] = None  # where they came from, for messages
    label_src: Optional[str] = None


def _sizes(paths: tuple[str, str]) -> tuple[tuple[int, int], tuple[int, int]]:
    return _image_size(paths[0]), _image_size(paths[1])


def _name_some(ids: Sequence[str], limit: int = 50) -> str:
    s = ", ".join(ids[:limit])
    return s + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _final_check(pool: _Pool, items: list[_Item], out: str, what_image: str, what_label: str) -> None:
    """Every id has an image and a label of the same size; errors name every id (all of them in a file)."""
    no_image = [f"{it.split}/{it.ident}" for it in items if not os.path.isfile(it.image)]
    no_label = [f"{it.split}/{it.ident}" for it in items if not os.path.isfile(it.label)]
    if no_image or no_label:
        parts = []
        if no_image:
            parts.append(f"{len(no_image)} ids have no image (looked for {what_image}): {_name_some(no_image)}")
        if no_label:
            parts.append(f"{len(no_label)} ids have no label (looked for {what_label}): {_name_some(no_label)}")
        msg = f"prepared folder {out} is incomplete: " + "; ".join(parts)
        if len(no_image) > 50 or len(no_label) > 50:
            path = os.path.join(out, MISSING)
            _atomic_write(path, "".join(f"no image\t{i}\n" for i in no_image).encode()
                          + "".join(f"no label\t{i}\n" for i in no_label).encode())
            msg += f" (every id is in {path})"
        raise DataError(msg)
    sizes = pool.map(_sizes, [(it.image, it.label) for it in items])
    bad = [(it, s) for it, s in zip(items, sizes) if s[0] != s[1]]
    if bad:
        it, ((ih, iw), (lh, lw)) = bad[0]
        raise DataError(
            f"label of {it.split}/{it.ident} ({it.label_src or it.label}) is {lw}x{lh} but its image "
            f"({it.image_src or it.image}) is {iw}x{ih} (WxH)"
            + (f"; {len(bad) - 1} more ids differ in size: {_name_some([f'{b.split}/{b.ident}' for b, _ in bad[1:]])}"
               if len(bad) > 1 else ""))


def _remove(path: str) -> int:
    """Delete a file; 1 if there was one, else 0."""
    try:
        os.remove(path)
        return 1
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise DataError(f"cannot delete {path}: {e}") from e


def _read_doc(path: str) -> Optional[dict]:
    """A marker's or stamp's JSON; None when there is none, ``{"unreadable": why}`` when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return {"unreadable": str(e)}
    return doc if isinstance(doc, dict) else {"unreadable": "not a JSON object"}


def _matches(doc: dict, dataset: str, sources: dict) -> bool:
    return doc.get("version") == MARKER_VERSION and doc.get("dataset") == dataset and doc.get("sources") == sources


def _describe_source(ident) -> str:
    if isinstance(ident, list):
        return "[" + "; ".join(_describe_source(i) for i in ident) + "]"
    if not isinstance(ident, dict) or "path" not in ident:
        return "none" if ident is None else repr(ident)
    try:
        if "files" in ident:
            return (f"folder {ident['path']} ({ident['files']} files read, {ident['bytes']} bytes, "
                    f"listing digest {str(ident.get('listing_sha256'))[:12]})")
        if "size" in ident:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ident["mtime_ns"] / 1e9))
            return f"{ident['path']} ({ident['size']} bytes, modified {when})"
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        return repr(ident)  # a hand-edited marker: show it as it is
    return f"{ident['path']}"


def _mismatch(doc: dict, dataset: str, sources: dict) -> str:
    """Why a marker or stamp is not this run's, in words."""
    if "unreadable" in doc:
        return f"that cannot be read ({doc['unreadable']})"
    if doc.get("version") != MARKER_VERSION:
        return (f"in format {doc.get('version')!r}, not {MARKER_VERSION} (another version of cps-fast prepare; "
                "it does not record the sources the same way)")
    if doc.get("dataset") != dataset:
        return f"for dataset {doc.get('dataset')!r}, not {dataset!r}"
    old = doc.get("sources") if isinstance(doc.get("sources"), dict) else {}
    diffs = [f"--{k} was {_describe_source(old.get(k))}, now {_describe_source(v)}"
             for k, v in sources.items() if old.get(k) != v]
    return "made from other sources: " + ("; ".join(diffs) or f"{sorted(old)} then, {sorted(sources)} now")


def _first_file(out: str) -> Optional[str]:
    """The first file (or link) found below ``out``, relative to it; None for a missing or empty tree."""
    for dirpath, dirnames, filenames in os.walk(out):
        dirnames.sort()
        if filenames:
            return os.path.relpath(os.path.join(dirpath, min(filenames)), out)
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                return os.path.relpath(os.path.join(dirpath, d), out) + " (a link to a folder)"
    return None


def _clear_for_force(out: str, dirs: Sequence[str], lists: Sequence[str]) -> int:
    """``--force``: delete what a run writes (the files of its data folders, its lists, marker, stamp and
    leftovers), stamp and marker first; other files and folders stay. Returns how many files went."""
    real_out = os.path.realpath(out)
    for d in dirs:
        if os.path.realpath(d) != os.path.join(real_out, os.path.relpath(d, out)):
            raise DataError(f"--force: {d} leads through a symbolic link (to {os.path.realpath(d)}); --force deletes "
                            "the files of the folders it writes and will not do so through a link: remove the link "
                            "or choose another --out")
    n = _remove(os.path.join(out, STAMP)) + _remove(os.path.join(out, MARKER))
    for p in [*lists, os.path.join(out, MISSING)]:
        n += _remove(p)
    for d in dirs:
        if os.path.isdir(d):
            for e in os.scandir(d):
                if not e.is_dir(follow_symlinks=False):
                    n += _remove(e.path)
    _clean_partials({out, *(os.path.dirname(p) for p in lists)})
    return n


def _claim(out: str, dataset: str, sources: dict, *, files_of: Callable[[str], list[str]], dirs: Sequence[str],
           lists: Sequence[str], force: bool, prog: _Progress) -> Optional[dict]:
    """Make ``out`` this run's before anything else is written there.

    Returns the marker's counts when ``out`` is already complete for these sources (nothing to do);
    otherwise writes the stamp and returns None. Files already in ``out`` are reused (skipped when they
    look done) only where its stamp or marker names these very sources, i.e. this tool wrote them from
    them. Anything else (a stamp or marker of other sources, another dataset or format, or files with
    neither) raises a DataError saying what is there, unless ``force``: then every file the run writes
    is deleted first, so nothing old is trusted, and an interruption of that run resumes as any other.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out {out} is a file, not a folder")
    stamp_path, marker_path = os.path.join(out, STAMP), os.path.join(out, MARKER)
    if force:
        n = _clear_for_force(out, dirs, lists)
        prog.line(f"--force: deleted {n} files of earlier runs or other sources from {out}; writing every file anew")
    else:
        st, mk = _read_doc(stamp_path), _read_doc(marker_path)
        problem = None
        if st is not None and not _matches(st, dataset, sources):
            problem = f"holds the stamp of an unfinished run ({STAMP}) {_mismatch(st, dataset, sources)}"
        elif mk is not None and not _matches(mk, dataset, sources):
            problem = f"holds a prepared folder ({MARKER}) {_mismatch(mk, dataset, sources)}"
        elif st is None and mk is None:
            first = _first_file(out)
            if first is not None:
                problem = (f"already holds files (for example {first}) but neither {STAMP} nor {MARKER}, "
                           "so nothing says they were prepared from these sources")
        if problem is not None:
            written = ", ".join(os.path.relpath(p, out) for p in [*dirs, *lists])
            raise DataError(f"--out {out} {problem}. Its files are not reused: pass --force (force=True) to delete "
                            f"the files this writes ({written}; others stay) and write every file anew, or choose "
                            "another --out")
        if mk is not None:
            try:
                complete = all(os.path.isfile(p) for p in files_of(out))
            except (OSError, DataError):
                complete = False
            if complete:
                _remove(stamp_path)  # left when a run stopped between its marker and its end
                return mk.get("counts")
        if st is not None:  # resume the run that wrote the stamp
            _remove(marker_path)
            return None
    os.makedirs(out, exist_ok=True)
    stamp = {"version": MARKER_VERSION, "tool": "cps-fast prepare", "dataset": dataset, "state": "started",
             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sources": sources}
    _atomic_write(stamp_path, (json.dumps(stamp, indent=2) + "\n").encode("utf-8"))
    _remove(marker_path)  # these sources' marker of a folder found incomplete: it is not complete now
    return None


def _finish(out: str, dataset: str, layout: str, sources: dict, lists: dict[str, str], counts: dict) -> None:
    """Write the lists, then the marker (the folder is complete), then drop the stamp and any missing-ids file."""
    for rel, text in lists.items():
        _atomic_write(os.path.join(out, rel), text.encode("utf-8"))
    marker = {"version": MARKER_VERSION, "tool": "cps-fast prepare", "dataset": dataset, "layout": layout,
              "sources": sources, "counts": counts, "lists": sorted(lists)}
    _atomic_write(os.path.join(out, MARKER), (json.dumps(marker, indent=2) + "\n").encode("utf-8"))
    _remove(os.path.join(out, STAMP))
    _remove(os.path.join(out, MISSING))


def _warn_counts(dataset: str, counts: dict, official: dict) -> None:
    for split, n in counts.items():
        if n != official[split]:
            log.warning(f"prepare {dataset}: {split} has {n} ids; the official archives give {official[split]} "
                        "(expected for a subset or a test fixture, otherwise check the sources)")


def _counts_text(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _require_scipy() -> None:
    try:
        import scipy.io  # noqa: F401
    except ImportError:
        raise DataError("cps-fast prepare voc reads SBD's MATLAB labels with scipy, which is not installed: "
                        "pip install 'cps-fast[prepare]' (or pip install scipy)") from None


# --------------------------------------------------------------------------- voc

def _voc_files(out: str) -> list[str]:
    paths = [os.path.join(out, "train_aug.txt"), os.path.join(out, "val.txt")]
    for split in ("train_aug", "val"):
        with open(os.path.join(out, f"{split}.txt"), "rb") as f:
            for ident in _parse_ids(f.read(), f"{out}/{split}.txt"):
                paths += [os.path.join(out, split, "image", ident + ".jpg"),
                          os.path.join(out, split, "label", ident + ".png")]
    return paths


def prepare_voc(voc: str, sbd: str, out: str, *, workers: Optional[int] = None, progress=None,
                force: bool = False) -> dict:
    """Write TorchSemiSeg's ``DATA/pascal_voc`` folder from VOC 2012 trainval and SBD.

    ``voc``: ``VOCtrainval_11-May-2012.tar`` or its extracted folder; ``sbd``: ``benchmark.tgz``
    or its extracted folder. ``progress``: the stream for the progress bar (default stderr).
    ``force``: delete what an earlier run or another source left in ``out``'s data folders and
    write every file anew (without it such a folder is refused, see :func:`_claim`).
    Returns the counts written, ``{"train_aug": n, "val": n}``.
    """
    _require_scipy()
    workers = _workers(workers)
    voc_src, sbd_src = _open_voc(voc), _open_sbd(sbd)
    sources = {"voc": voc_src.identity(_classify_voc), "sbd": sbd_src.identity(_classify_sbd)}
    out = os.path.abspath(os.path.expanduser(str(out)))
    title = "prepare voc"
    dirs = {(s, k): os.path.join(out, s, k) for s in ("train_aug", "val") for k in ("image", "label")}
    prog = _Progress(title, progress)
    done = _claim(out, "voc", sources, files_of=_voc_files, dirs=list(dirs.values()),
                  lists=[os.path.join(out, "train_aug.txt"), os.path.join(out, "val.txt")], force=force, prog=prog)
    if done is not None:
        print(f"{title}: {out} is already complete ({MARKER} matches the sources): {_counts_text(done)}")
        return done
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    _clean_partials([out, *dirs.values()])
    _remove(os.path.join(out, MISSING))  # of an earlier run: this run's final check writes its own

    prog.line(f"VOC {voc_src.path} + SBD {sbd_src.path} -> {out} ({workers} workers)")
    try:
        # 1. VOC's index: its lists, which ids it has JPEGs and labels for
        voc_members = voc_src.members(_classify_voc, keep=("list",))
        voc_lists = {m.key: _parse_ids(m.read(), m.where) for m in voc_members if m.kind == "list"}
        voc_jpg = {m.key for m in voc_members if m.kind == "jpg"}
        voc_seg = {m.key for m in voc_members if m.kind == "seg"}
        missing = [f"VOC2012/ImageSets/Segmentation/{s}.txt" for s in ("train", "val") if s not in voc_lists]
        if not voc_jpg:
            missing.insert(0, "VOC2012/JPEGImages/<id>.jpg")
        if missing:
            raise DataError(f"--voc {voc_src.path} has no {', '.join(missing)} (expected VOCtrainval_11-May-2012.tar "
                            "or its extracted VOCdevkit/VOC2012 folder)")
        val = voc_lists["val"]
        val_set = set(val)

        items: dict[str, _Item] = {}
        strays: dict[str, list[str]] = {}  # SBD outputs written before SBD's lists were known

        def item(split: str, ident: str) -> _Item:
            it = items.get(ident)
            if it is None:
                it = items[ident] = _Item(split, ident, os.path.join(dirs[split, "image"], ident + ".jpg"),
                                          os.path.join(dirs[split, "label"], ident + ".png"))
            return it

        with _Pool(workers, prog) as pool:
            # 2. SBD in one pass: labels of the ids VOC does not label (never of VOC val ids),
            #    images of the ids VOC has no JPEG for. Its lists may come last in a .tgz.
            sbd_lists: dict[str, list[str]] = {}
            train_aug: Optional[list[str]] = None
            n_sbd = 0
            members = sbd_src.stream(_classify_sbd, keep=("list",))
            if not isinstance(sbd_src, _TarSource):  # a folder: take its lists first
                members = sorted(members, key=lambda m: m.kind != "list")
            for m in members:
                n_sbd += 1
                if m.kind == "list":
                    sbd_lists[m.key] = _parse_ids(m.read(), m.where)
                    if len(sbd_lists) == 2:
                        train_aug = sorted((set(sbd_lists["train"]) | set(sbd_lists["val"])
                                            | set(voc_lists["train"])) - val_set)
                        prog.set_total(2 * (len(train_aug) + len(val)))
                    continue
                ident = m.key
                if m.kind == "mat" and (ident in val_set or ident in voc_seg):
                    continue  # VOC labels it
                if m.kind == "img" and ident in voc_jpg:
                    continue  # VOC's JPEG is used
                it = item("val" if ident in val_set else "train_aug", ident)
                if m.kind == "mat":
                    dest, it.label_src, task, done = it.label, m.where, _sbd_label_task, _png_done(it.label)
                else:
                    dest, it.image_src, task, done = it.image, m.where, _copy_task, _copy_done(it.image, m.size)
                if ident not in val_set:
                    strays.setdefault(ident, []).append(dest)
                if done:
                    prog.add(present=True)
                    continue
                pool.submit(task, m, None if m.deferrable else m.read(), dest)
            if not n_sbd:
                raise DataError(f"--sbd {sbd_src.path} has none of dataset/cls/<id>.mat, dataset/img/<id>.jpg, "
                                "dataset/{train,val}.txt (expected SBD's benchmark.tgz or its "
                                "benchmark_RELEASE folder)")
            if train_aug is None:
                missing = [f"benchmark_RELEASE/dataset/{s}.txt" for s in ("train", "val") if s not in sbd_lists]
                raise DataError(f"--sbd {sbd_src.path} has no {', '.join(missing)}")
            train_set = set(train_aug)
            for ident in list(items):
                if ident not in train_set and ident not in val_set:
                    del items[ident]
            for ident in train_aug:
                item("train_aug", ident)
            for ident in val:
                item("val", ident)

            # 3. VOC's images and labels, in archive order
            for m in voc_members:
                if m.kind == "list" or m.key not in items:
                    continue
                it = items[m.key]
                if m.kind == "jpg":
                    dest, it.image_src, task, done = it.image, m.where, _copy_task, _copy_done(it.image, m.size)
                else:
                    dest, it.label_src, task, done = it.label, m.where, _voc_label_task, _png_done(it.label)
                if done:
                    prog.add(present=True)
                    continue
                pool.submit(task, m, None if m.deferrable else m.read(), dest)
            pool.drain()

            # 4. SBD files of ids that turned out not to be in train_aug
            for ident, paths in strays.items():
                if ident not in train_set:
                    for p in paths:
                        if os.path.exists(p):
                            os.remove(p)

            # 5. every id complete, label sizes equal the images'
            ordered = [items[i] for i in train_aug] + [items[i] for i in val]
            _final_check(pool, ordered, out,
                         "VOC2012/JPEGImages/<id>.jpg, then SBD dataset/img/<id>.jpg",
                         "VOC2012/SegmentationClass/<id>.png, then SBD dataset/cls/<id>.mat")
    finally:
        voc_src.close()
        sbd_src.close()
    counts = {"train_aug": len(train_aug), "val": len(val)}
    _finish(out, "voc", "TorchSemiSeg DATA/pascal_voc", sources,
            {"train_aug.txt": "".join(i + "\n" for i in train_aug), "val.txt": "".join(i + "\n" for i in val)},
            counts)
    prog.finish(f"wrote {out}")
    _warn_counts("voc", counts, VOC_COUNTS)
    print(f"{title}: {_counts_text(counts)} in {out}")
    return counts


# --------------------------------------------------------------------------- cityscapes

def _open_cityscapes(path: str) -> list:
    path = _require_path(path, "--root")
    if os.path.isdir(path):
        found = []
        subdirs = [os.path.join(top, s) for top in ("leftImg8bit", "gtFine") for s in ("train", "val")
                   if os.path.isdir(os.path.join(path, top, s))]
        if subdirs:
            found.append(_FolderSource(path, "", subdirs))
        for name in sorted(os.listdir(path)):
            p = os.path.join(path, name)
            if name.lower().endswith(".zip") and os.path.isfile(p):
                found.append(_ZipSource(p))
        if not found:
            raise DataError(f"--root folder {path} holds neither leftImg8bit/ and gtFine/ folders nor the zips "
                            "leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip")
        return found
    if _archive_kind(path) != "zip":
        raise DataError(f"--root {path} is neither a folder nor a zip archive (expected "
                        "leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip or a folder holding them)")
    return [_ZipSource(path)]


def _city_files(out: str) -> list[str]:
    paths = []
    for split in ("train", "val"):
        lst = os.path.join(out, "config_new", f"{split}.txt")
        paths.append(lst)
        with open(lst, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    paths += [os.path.join(out, p.lstrip("/")) for p in line.split()]
    return paths


def prepare_cityscapes(roots: Sequence[str], out: str, *, workers: Optional[int] = None, progress=None,
                       force: bool = False) -> dict:
    """Write TorchSemiSeg's ``DATA/city`` folder from Cityscapes' leftImg8bit and gtFine.

    ``roots``: ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip``, a folder holding
    them, or a folder holding ``leftImg8bit/`` and ``gtFine/``. ``force`` as in :func:`prepare_voc`.
    Returns ``{"train": n, "val": n}``.
    """
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    workers = _workers(workers)
    out = os.path.abspath(os.path.expanduser(str(out)))
    title = "prepare cityscapes"
    dirs = {(s, k): os.path.join(out, k, s) for s in ("train", "val") for k in ("images", "segmentation")}
    config = os.path.join(out, "config_new")
    prog = _Progress(title, progress)
    srcs = []
    try:
        for r in roots:
            srcs += _open_cityscapes(r)
        sources = {"root": [s.identity(_classify_city) for s in srcs]}
        done = _claim(out, "cityscapes", sources, files_of=_city_files, dirs=list(dirs.values()),
                      lists=[os.path.join(config, f"{s}.txt") for s in ("train", "val")], force=force, prog=prog)
        if done is not None:
            print(f"{title}: {out} is already complete ({MARKER} matches the sources): {_counts_text(done)}")
            return done

        # index: the first source holding a file wins; labelTrainIds over labelIds
        members = [m for s in srcs for m in s.members(_classify_city)]
        images: dict = {}
        labels: dict = {}
        for m in members:
            if m.kind == "image":
                images.setdefault(m.key, m)
            else:
                cur = labels.get(m.key)
                if cur is None or (cur.kind == "labelIds" and m.kind == "labelTrainIds"):
                    labels[m.key] = m
        looked = ", ".join(s.path for s in srcs)
        if not images:
            raise DataError(f"no Cityscapes images in {looked}: looked for leftImg8bit/{{train,val}}/<city>/"
                            "<stem>_leftImg8bit.png (leftImg8bit_trainvaltest.zip)")
        if not labels:
            raise DataError(f"no Cityscapes fine labels in {looked}: looked for gtFine/{{train,val}}/<city>/"
                            "<stem>_gtFine_labelIds.png or _labelTrainIds.png (gtFine_trainvaltest.zip)")

        for d in [*dirs.values(), config]:
            os.makedirs(d, exist_ok=True)
        _clean_partials([out, config, *dirs.values()])
        _remove(os.path.join(out, MISSING))  # of an earlier run: this run's final check writes its own
        keys = sorted(set(images) | set(labels))
        items = {k: _Item(k[0], k[1], os.path.join(dirs[k[0], "images"], k[1] + ".png"),
                          os.path.join(dirs[k[0], "segmentation"], k[1] + "_gtFine.png")) for k in keys}

        prog.set_total(len(images) + len(labels))
        prog.line(f"{looked} -> {out} ({workers} workers)")
        with _Pool(workers, prog) as pool:
            for m in members:  # archive order
                it = items[m.key]
                if m is images.get(m.key):
                    dest, it.image_src, task, done = it.image, m.where, _copy_task, _copy_done(it.image, m.size)
                elif m is labels.get(m.key):
                    dest, it.label_src, task, done = it.label, m.where, _city_label_task, _png_done(it.label)
                else:
                    continue
                if done:
                    prog.add(present=True)
                    continue
                pool.submit(task, m, None if m.deferrable else m.read(), dest)
            pool.drain()
            _final_check(pool, [items[k] for k in keys], out,
                         "leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png",
                         "gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png or _labelIds.png")
    finally:
        for s in srcs:
            s.close()
    lists, counts = {}, {}
    for split in ("train", "val"):
        stems = [k[1] for k in keys if k[0] == split]
        counts[split] = len(stems)
        lists[f"config_new/{split}.txt"] = "".join(
            f"/images/{split}/{s}.png\t/segmentation/{split}/{s}_gtFine.png\n" for s in stems)
    _finish(out, "cityscapes", "TorchSemiSeg DATA/city", sources, lists, counts)
    prog.finish(f"wrote {out}")
    _warn_counts("cityscapes", counts, CITYSCAPES_COUNTS)
    print(f"{title}: {_counts_text(counts)} in {out}")
    return counts


# --------------------------------------------------------------------------- command line

def _positive_int(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


_FORCE_HELP = ("--out holds files of other sources, of an older cps-fast, or of unknown origin: delete the files of "
               "the folders this writes (others stay) and write every file anew")


def main(argv: Optional[Iterable[str]] = None) -> int:
    """``cps-fast prepare {voc,cityscapes}``: the presets' data folders from the official archives."""
    ap = argparse.ArgumentParser(
        prog="cps-fast prepare",
        description="Write a preset's data folder (the layout of the official CPS code, TorchSemiSeg) from the "
                    "official archives, read in place. Resumable: rerun after an interruption.")
    sub = ap.add_subparsers(dest="dataset", required=True, metavar="{voc,cityscapes}")
    v = sub.add_parser("voc", help="PASCAL VOC 2012 + SBD -> train_aug (10582) and val (1449)",
                       description="Write DATA/pascal_voc: train_aug/{image,label}, val/{image,label}, "
                                   "train_aug.txt, val.txt.")
    v.add_argument("--voc", required=True, metavar="PATH",
                   help="VOCtrainval_11-May-2012.tar or its extracted folder (VOCdevkit/VOC2012 or above)")
    v.add_argument("--sbd", required=True, metavar="PATH",
                   help="SBD's benchmark.tgz or its extracted folder (benchmark_RELEASE/dataset or above)")
    v.add_argument("--out", required=True, metavar="DIR", help="the folder to write (created)")
    v.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="decode/encode threads (default min(8, CPU count))")
    v.add_argument("--force", action="store_true", help=_FORCE_HELP)
    c = sub.add_parser("cityscapes", help="Cityscapes leftImg8bit + gtFine -> train (2975) and val (500)",
                       description="Write DATA/city: images/{train,val}, segmentation/{train,val} (train ids), "
                                   "config_new/{train,val}.txt.")
    c.add_argument("--root", required=True, nargs="+", metavar="PATH",
                   help="leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip, or a folder holding them "
                        "or holding leftImg8bit/ and gtFine/")
    c.add_argument("--out", required=True, metavar="DIR", help="the folder to write (created)")
    c.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="decode/encode threads (default min(8, CPU count))")
    c.add_argument("--force", action="store_true", help=_FORCE_HELP)
    args = ap.parse_args(None if argv is None else list(argv))
    if args.dataset == "voc":
        prepare_voc(args.voc, args.sbd, args.out, workers=args.workers, force=args.force)
    else:
        prepare_cityscapes(args.root, args.out, workers=args.workers, force=args.force)
    return 0
