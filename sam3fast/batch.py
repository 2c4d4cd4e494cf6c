"""Batch jobs for ``sam3fast segment`` / ``sam3fast track``: many inputs, one process or many.

Inputs. The positional INPUT of the command is read as (first rule that applies):

1. ``@FILE``: a list file, one input path per line; blank lines and lines starting with ``#`` are
   skipped, relative paths are relative to the list file's folder. Outputs are named relative to the
   deepest folder holding every listed input. Missing or unreadable entries get error records.
2. an existing folder: searched recursively (hidden names and the ``--out`` folder skipped) for images
   (segment: ``IMAGE_EXTS``) or videos (track: ``VIDEO_EXTS`` files and frame folders, a frame folder
   being a folder that directly holds image files). Outputs are named relative to the folder.
   For ``track``, a folder that itself holds image files is one video (a frame folder), as before.
3. a path that does not exist and contains ``*``, ``?`` or ``[``: a glob (``**`` recurses; quote it
   so the shell leaves it alone). Every match is an input (segment: files only; track: files and
   frame folders), except matches under ``--out``. Outputs are named relative to the glob's leading
   folders that hold no wildcard (``data/*/img_*.png`` -> relative to ``data``).
4. anything else: one file, handled exactly as before (``<stem>.json`` and an overlay).

Outputs. For an input at relative path REL (extension kept, so ``a/x.png`` and ``b/x.png``, or
``x.png`` and ``x.jpg``, never collide): ``OUT/REL.json`` and, with ``--overlay``,
``OUT/REL.overlay.png`` (segment) or ``OUT/REL.overlay.mp4`` (track). Every file is written to a
temporary ``.NAME.partial-XXXXXXXX.EXT`` in the same folder and moved into place with
``os.replace``; overlays are written before the JSON, so a JSON at its final name means the input is
done. An input whose read or inference fails gets an error record ``{"image"|"video": PATH,
"error": MESSAGE}`` at ``OUT/REL.json``; the job goes on and exits 1 at the end with a summary.

Resume. An input is complete when its JSON parses, has no ``"error"`` key and (with ``--overlay``) its
overlay exists. A re-run skips complete inputs (their files are not touched), retries error records,
and deletes the temporary files a crashed run left for the inputs it checks.

Sharding. The sorted input list is cut into fixed chunks of ``batch_size`` consecutive inputs (one
backbone batch each; ``track`` uses chunks of one video). The chunks that still have an incomplete
input are dealt round-robin to the ranks (chunk k of that list to rank k mod WORLD_SIZE). A chunk
with some inputs already done is run whole and only its missing outputs are written: every image is
then always computed in the same batch, so results do not depend on the number of ranks or on where
a crash fell (byte-identical outputs on the same machine).

Distribution. Under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set, WORLD_SIZE > 1)
each rank initialises ``torch.distributed``: NCCL on CUDA (device ``cuda:LOCAL_RANK``) with a gloo
group beside it for host-side counters, gloo on CPU. Collectives are used only to share the input
list (broadcast from rank 0), the completeness check (all_gather), the progress counters and the
final summary. Without torchrun variables it runs in one process over the whole list.

Progress. Rank 0 draws one tqdm bar for the whole job; the others are quiet. Each rank runs a small
thread that every ``PROGRESS_INTERVAL_S`` seconds all_reduces its (done, failed, finished) counters on
the gloo group, so ranks never wait for each other between inputs; the threads stop together once
every rank has finished, which is also the job's final barrier.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm")
LIST_PREFIX = "@"
PARTIAL_TAG = ".partial-"
PROGRESS_INTERVAL_S = 0.5
_GLOB_MAGIC = re.compile(r"[*?[]")


@dataclass(frozen=True)
class Item:
    """One input of a job: ``path`` absolute, ``rel`` its path relative to the job root (names the
    outputs)."""

    path: str
    rel: str


# ----------------------------------------------------------------------------------------------
# Input listing


def _is_frame_folder(path: str) -> bool:
    from .video.io import IMAGE_EXTS as FRAME_EXTS

    try:
        return any(os.path.splitext(n)[1].lower() in FRAME_EXTS and os.path.isfile(os.path.join(path, n))
                   for n in os.listdir(path))
    except OSError:
        return False


def input_kind(spec: str, media: str) -> str:
    """How INPUT is read: ``"list"``, ``"folder"``, ``"glob"`` or ``"single"`` (see the module
    docstring). ``media`` is ``"image"`` (segment) or ``"video"`` (track)."""
    if media not in ("image", "video"):
        raise ValueError(f"media must be 'image' or 'video', got {media!r}")
    if spec.startswith(LIST_PREFIX):
        return "list"
    if os.path.isdir(spec):
        if media == "video" and _is_frame_folder(spec):
            return "single"
        return "folder"
    if not os.path.exists(spec) and _GLOB_MAGIC.search(spec):
        return "glob"
    return "single"


def _under(path: str, folder: Optional[str]) -> bool:
    if folder is None:
        return False
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk(root: str, media: str, skip: Optional[str]) -> List[str]:
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and not _under(os.path.join(d, x), skip))
        if media == "image":
            found += [os.path.join(d, f) for f in files
                      if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTS]
            continue
        keep = []
        for x in dirs:
            full = os.path.join(d, x)
            if _is_frame_folder(full):
                found.append(full)  # one video: do not descend into its frames
            else:
                keep.append(x)
        dirs[:] = keep
        found += [os.path.join(d, f) for f in files
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in VIDEO_EXTS]
    return found


def _glob_root(pattern: str) -> str:
    parts = os.path.normpath(pattern).split(os.sep)
    lead = []
    for p in parts[:-1]:
        if _GLOB_MAGIC.search(p):
            break
        lead.append(p)
    if not lead:
        return os.getcwd()
    root = os.sep.join(lead)
    return os.path.abspath(root or os.sep)


def _read_list(list_path: str) -> List[str]:
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"list file not found: {list_path!r} (an input starting with "
                                f"{LIST_PREFIX!r} names a text file listing one input per line)")
    base = os.path.dirname(os.path.abspath(list_path))
    paths = []
    with open(list_path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            line = os.path.expanduser(line)
            paths.append(line if os.path.isabs(line) else os.path.join(base, line))
    return paths


def list_inputs(spec: str, media: str, out_dir: Optional[str] = None) -> List[Item]:
    """The job's inputs for INPUT ``spec``, sorted by absolute path, duplicates removed. Raises
    ValueError when nothing is found (or ``spec`` is a single input), FileNotFoundError for a
    missing list file."""
    kind = input_kind(spec, media)
    skip = os.path.abspath(out_dir) if out_dir is not None else None
    if kind == "list":
        paths = [os.path.abspath(p) for p in _read_list(spec[len(LIST_PREFIX):])]
        root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else None
    elif kind == "folder":
        root = os.path.abspath(spec)
        paths = [os.path.abspath(p) for p in _walk(root, media, skip)]
    elif kind == "glob":
        import glob

        root = _glob_root(spec)
        paths = []
        for p in glob.glob(spec, recursive=True):
            p = os.path.abspath(p)
            if _under(p, skip):
                continue
            if os.path.isfile(p) or (media == "video" and os.path.isdir(p) and _is_frame_folder(p)):
                paths.append(p)
    else:
        raise ValueError(f"{spec!r} is a single input, not a folder, glob or {LIST_PREFIX}list")
    paths = sorted(set(paths))
    if not paths:
        what = "images" if media == "image" else "videos"
        raise ValueError(f"no {what} found for {spec!r} ({kind})")
    return [Item(p, os.path.relpath(p, root)) for p in paths]


# ----------------------------------------------------------------------------------------------
# Atomic outputs


def output_paths(out_dir: str, item: Item, overlay_ext: Optional[str]) -> Tuple[str, Optional[str]]:
    """(json path, overlay path or None) of ``item``: ``OUT/REL.json``, ``OUT/REL.overlay<ext>``."""
    base = os.path.join(out_dir, item.rel)
    return base + ".json", (base + ".overlay" + overlay_ext) if overlay_ext else None


def _temp_path(path: str) -> str:
    d, name = os.path.split(path)
    ext = os.path.splitext(name)[1]  # kept: writers (PIL, OpenCV) pick the format from it
    return os.path.join(d, f".{name}{PARTIAL_TAG}{uuid.uuid4().hex[:8]}{ext}")


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file in ``path``'s folder, then ``os.replace`` it onto ``path``;
    the temporary file is removed if ``write`` fails."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _temp_path(path)
    try:
        write(tmp)
        if not os.path.isfile(tmp):
            raise RuntimeError(f"writing {path!r} produced no file")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def write_json_atomic(path: str, doc: dict) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, w)


def is_complete(json_path: str, overlay_path: Optional[str] = None) -> bool:
    """True when ``json_path`` parses as a JSON object without ``"error"`` (and the overlay exists)."""
    try:
        with open(json_path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(doc, dict) or "error" in doc:
        return False
    return overlay_path is None or os.path.isfile(overlay_path)


def clean_partials(paths: Iterable[str]) -> int:
    """Delete temporary files left by a crashed writer of any of ``paths``; returns how many."""
    by_dir: Dict[str, set] = {}
    for p in paths:
        d, name = os.path.split(p)
        by_dir.setdefault(d, set()).add(name)
    n = 0
    for d, names in by_dir.items():
        try:
            entries = os.listdir(d)
        except OSError:
            continue
        for e in entries:
            if e.startswith(".") and PARTIAL_TAG in e and e[1:].rsplit(PARTIAL_TAG, 1)[0] in names:
                try:
                    os.remove(os.path.join(d, e))
                    n += 1
                except OSError:
                    pass
    return n


# ----------------------------------------------------------------------------------------------
# torch.distributed


class DistContext:
    """Rank, world size and device of this process; ``torch.distributed`` only under torchrun."""

    def __init__(self, device: Optional[str] = None):
        import torch

        env = os.environ
        self.world = int(env.get("WORLD_SIZE", "1"))
        self.rank = int(env.get("RANK", "0"))
        self.local_rank = int(env.get("LOCAL_RANK", "0"))
        self.distributed = self.world > 1 and "RANK" in env
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for but no CUDA device is available")
        if dev.type == "cuda" and dev.index is None and self.distributed:
            dev = torch.device("cuda", self.local_rank)
        self.device = dev
        self.group = None
        if self.distributed:
            import torch.distributed as dist

            if not dist.is_available():
                raise RuntimeError("this PyTorch build has no torch.distributed; run without torchrun")
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
                dist.init_process_group(backend="nccl")
                self.group = dist.new_group(backend="gloo")  # host-side counters and lists
            else:
                dist.init_process_group(backend="gloo")

    def broadcast(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_gather(self, obj: Any) -> List[Any]:
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


class Progress:
    """Whole-job progress: a tqdm bar on rank 0 fed by every rank (see the module docstring)."""

    def __init__(self, ctx: DistContext, total: int, initial: int, desc: str, unit: str):
        self.ctx = ctx
        self.initial = initial
        self._done = 0
        self._failed = 0
        self._finished = False
        self.bar = None
        if ctx.rank == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
        self._thread = None
        self._error: Optional[BaseException] = None
        if ctx.distributed:
            self._thread = threading.Thread(target=self._sync_loop, name="sam3fast-progress", daemon=True)
            self._thread.start()

    def advance(self, failed: bool = False) -> None:
        self._done += 1
        self._failed += int(failed)
        if not self.ctx.distributed and self.bar is not None:
            self.bar.update(1)
            if failed:
                self.bar.set_postfix(failed=self._failed)

    def _sync_loop(self) -> None:
        try:
            self._sync()
        except BaseException as e:  # a peer died: re-raised by finish()
            self._error = e

    def _sync(self) -> None:
        import torch
        import torch.distributed as dist

        while True:
            time.sleep(PROGRESS_INTERVAL_S)
            finished = self._finished  # read before the counts: a finished rank's counts are final
            t = torch.tensor([self._done, self._failed, int(finished)], dtype=torch.int64)
            dist.all_reduce(t, group=self.ctx.group)
            done, failed, n_finished = (int(v) for v in t)
            if self.bar is not None:
                self.bar.update(self.initial + done - self.bar.n)
                if failed:
                    self.bar.set_postfix(failed=failed, refresh=False)
                self.bar.refresh()
            if n_finished == self.ctx.world:
                return

    def finish(self) -> None:
        """Called by every rank once its share is done; returns when every rank has finished."""
        self._finished = True
        if self._thread is not None:
            self._thread.join()
        if self.bar is not None:
            self.bar.close()
        if self._error is not None:
            raise RuntimeError(f"progress sync between ranks failed: {self._error}") from self._error


# ----------------------------------------------------------------------------------------------
# The job

# process(state, chunk) yields (item, doc, overlay_writer) for every item of the chunk: doc is the
# JSON record (with "error" on failure), overlay_writer(tmp_path) writes the overlay (or None).
ProcessFn = Callable[[Any, Sequence[Item]], Iterable[Tuple[Item, dict, Optional[Callable[[str], None]]]]]


def run_job(spec: str, media: str, *, out_dir: str, chunk_size: int, overlay_ext: Optional[str],
            device: Optional[str], setup: Callable[[str], Any], process: ProcessFn, banner: str = "") -> int:
    """Run a batch job (module docstring). ``setup(device)`` builds the per-rank state (the model)
    once; ``process`` runs one chunk. Returns 0, 1 (some inputs failed: error records written) or 2
    (no inputs / bad arguments)."""
    if chunk_size < 1:
        print(f"error: --batch-size must be >= 1, got {chunk_size}", file=sys.stderr)
        return 2
    try:
        ctx = DistContext(device)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # On a crash the exception propagates without tearing the process group down (the progress
    # thread may be inside a collective): torchrun stops the other ranks, and a re-run resumes.
    rc = _run(ctx, spec, media, out_dir, chunk_size, overlay_ext, setup, process, banner)
    ctx.close()
    return rc


def _run(ctx: DistContext, spec, media, out_dir, chunk_size, overlay_ext, setup, process, banner) -> int:
    is0 = ctx.rank == 0
    items, err = None, None
    if is0:
        try:
            items = list_inputs(spec, media, out_dir)
        except (ValueError, OSError) as e:
            err = str(e)
    items, err = ctx.broadcast((items, err))
    if err is not None:
        if is0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = os.path.abspath(out_dir)
    chunks = [items[i:i + chunk_size] for i in range(0, len(items), chunk_size)]

    # Which chunks still have work: each rank checks every WORLD-th chunk, then all share the list.
    checked = range(ctx.rank, len(chunks), ctx.world)
    clean_partials(p for c in checked for it in chunks[c] for p in output_paths(out_dir, it, overlay_ext) if p)
    todo_local: Dict[int, List[int]] = {}
    done_local = 0
    for c in checked:
        todo = [j for j, it in enumerate(chunks[c]) if not is_complete(*output_paths(out_dir, it, overlay_ext))]
        done_local += len(chunks[c]) - len(todo)
        if todo:
            todo_local[c] = todo
    gathered = ctx.all_gather((todo_local, done_local))
    todo_all: Dict[int, List[int]] = {}
    for t, _ in gathered:
        todo_all.update(t)
    done_before = sum(d for _, d in gathered)
    pending = sorted(todo_all)
    mine = pending[ctx.rank::ctx.world]
    if is0:
        n_todo = sum(len(v) for v in todo_all.values())
        where = f" on {ctx.world} ranks" if ctx.distributed else ""
        print(f"{len(items)} input(s){banner}: {done_before} already done, {n_todo} to run{where} -> {out_dir}",
              file=sys.stderr)

    state = None
    if mine:
        from .checkpoint import CheckpointError

        try:
            state = setup(str(ctx.device))
        except (CheckpointError, ValueError) as e:  # bad checkpoint / config / device / dtype
            print(f"error: {e}", file=sys.stderr)
            return 2
    unit = "image" if media == "image" else "video"
    prog = Progress(ctx, total=len(items), initial=done_before, desc=f"sam3fast {unit}s", unit=unit)
    failures: List[Tuple[str, str]] = []
    for c in mine:
        chunk = chunks[c]
        todo = {chunk[j].path for j in todo_all[c]}
        for item, doc, overlay in process(state, chunk):
            if item.path not in todo:
                continue  # complete from an earlier run: computed (same batch) but not rewritten
            json_path, overlay_path = output_paths(out_dir, item, overlay_ext)
            failed = "error" in doc
            if failed:
                failures.append((item.path, str(doc["error"])))
            elif overlay_path is not None and overlay is not None:
                write_atomic(overlay_path, overlay)
            write_json_atomic(json_path, doc)
            prog.advance(failed)
    prog.finish()

    all_failures = [f for fs in ctx.all_gather(failures) for f in fs]
    if is0:
        ran = sum(len(v) for v in todo_all.values())
        print(f"done{banner}: {ran - len(all_failures)} written, {done_before} skipped (already done), "
              f"{len(all_failures)} failed; outputs in {out_dir}", file=sys.stderr)
        if all_failures:
            print(f"error: {len(all_failures)} input(s) failed (error records written as <input>.json):",
                  file=sys.stderr)
            for path, msg in sorted(all_failures)[:20]:
                print(f"  {path}: {msg}", file=sys.stderr)
            if len(all_failures) > 20:
                print(f"  ... and {len(all_failures) - 20} more", file=sys.stderr)
    ctx.barrier()
    return 1 if all_failures else 0


def error_record(media: str, path: str, exc: BaseException) -> dict:
    """The JSON written for an input that failed."""
    return {media: path, "error": f"{type(exc).__name__}: {exc}"}
