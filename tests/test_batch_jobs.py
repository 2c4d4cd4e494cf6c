"""Batch jobs of the CLI (sam3fast.batch): folder / glob / @list inputs, sharding over 2 gloo ranks
under torchrun, atomic outputs, resume after a crash, error records, one progress bar.

Tiny model with random weights, 40x50 images; one thread per process so every run computes the
same floats (outputs are compared byte for byte). Two torchrun launches in all (each ~10 s here).
"""

import glob
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sam3fast import batch
from sam3fast.cli import main

SEG = ["--prompt", "cat", "--prompt", "dog", "--config", "tiny", "--random-weights", "--threshold", "0.0"]


@pytest.fixture(autouse=True)
def _no_hub_checkpoint_one_thread(tmp_path_factory, monkeypatch):
    """No checkpoint from the Hugging Face cache (random weights for sure), one torch thread."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path_factory.getbasetemp() / "hub"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """imgs/{a,b}/imNN.png: 20 random 40x50 images, the same basenames in both folders; beside
    them imgs/bad.png (not an image), imgs/notes.txt and imgs/.hidden.png (skipped by folder jobs)."""
    root = tmp_path_factory.mktemp("batch")
    rng = np.random.default_rng(0)
    for i in range(20):
        d = root / "imgs" / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(d / f"im{i // 2:02d}.png")
    (root / "imgs" / "bad.png").write_bytes(b"not a png")
    (root / "imgs" / "notes.txt").write_text("not an input")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "imgs" / ".hidden.png")
    return root


GOOD = sorted(f"{d}/im{k:02d}.png" for d in "ab" for k in range(10))


def _outputs(out):
    """Every file under ``out`` as a relative path -> bytes."""
    res = {}
    for d, _, files in os.walk(out):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                res[os.path.relpath(p, out)] = fh.read()
    return res


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One process, in this process: the glob over the 20 good images, overlays, batches of 3."""
    import huggingface_hub.constants as c

    out = tmp_path_factory.mktemp("ref")
    old, n = c.HF_HUB_CACHE, torch.get_num_threads()
    c.HF_HUB_CACHE = str(tmp_path_factory.getbasetemp() / "hub")
    torch.set_num_threads(1)
    try:
        rc = main(["segment", str(data / "imgs" / "*" / "*.png"), *SEG, "--out", str(out), "--batch-size", "3",
                   "--overlay"])
    finally:
        c.HF_HUB_CACHE = old
        torch.set_num_threads(n)
    assert rc == 0
    files = _outputs(out)
    assert sorted(files) == sorted([g + ".json" for g in GOOD] + [g + ".overlay.png" for g in GOOD])
    return files


# ----------------------------------------------------------------------------------------------
# Inputs and naming (no model)


def test_input_kinds_and_names(data, tmp_path):
    imgs = data / "imgs"
    assert batch.input_kind(str(imgs / "a" / "im00.png"), "image") == "single"
    assert batch.input_kind(str(imgs / "nope.png"), "image") == "single"  # missing file: the old error
    assert batch.input_kind(str(imgs), "image") == "folder"
    assert batch.input_kind(str(imgs / "*" / "*.png"), "image") == "glob"
    assert batch.input_kind("@" + str(tmp_path / "l.txt"), "image") == "list"

    folder = batch.list_inputs(str(imgs), "image")
    assert [it.rel for it in folder] == GOOD + ["bad.png"]  # sorted; .txt and hidden files skipped
    assert all(os.path.isabs(it.path) for it in folder)
    # same basenames in a/ and b/ give different outputs
    names = [batch.output_paths("OUT", it, ".png") for it in folder]
    assert len({j for j, _ in names}) == len({o for _, o in names}) == len(folder)
    assert names[0] == (os.path.join("OUT", "a", "im00.png.json"), os.path.join("OUT", "a", "im00.png.overlay.png"))

    glob_items = batch.list_inputs(str(imgs / "*" / "*.png"), "image")
    assert [it.rel for it in glob_items] == GOOD  # relative to the glob's wildcard-free folders
    assert [it.rel for it in batch.list_inputs(str(imgs / "**" / "im0[0-1].png"), "image")] == \
        ["a/im00.png", "a/im01.png", "b/im00.png", "b/im01.png"]

    lst = tmp_path / "inputs.txt"
    lst.write_text("# comment\n\n" + "\n".join(str(imgs / g) for g in reversed(GOOD)) + "\n"
                   + str(imgs / "a" / "im00.png") + "\n")  # duplicate dropped
    assert [it.rel for it in batch.list_inputs("@" + str(lst), "image")] == GOOD
    rel_list = imgs / "rel.txt"  # relative lines resolve against the list file's folder
    rel_list.write_text("b/im03.png\na/im03.png\n")
    try:
        items = batch.list_inputs("@" + str(rel_list), "image")
    finally:
        rel_list.unlink()
    assert [(it.rel, it.path) for it in items] == [("a/im03.png", str(imgs / "a" / "im03.png")),
                                                   ("b/im03.png", str(imgs / "b" / "im03.png"))]

    # the --out folder is never read back as input
    assert [it.rel for it in batch.list_inputs(str(imgs), "image", out_dir=str(imgs / "b"))] == \
        [g for g in GOOD if g.startswith("a/")] + ["bad.png"]

    with pytest.raises(ValueError, match="no images found"):
        batch.list_inputs(str(imgs / "*.jpg"), "image")
    with pytest.raises(FileNotFoundError, match="list file not found"):
        batch.list_inputs("@" + str(tmp_path / "missing.txt"), "image")
    with pytest.raises(ValueError, match="single input"):
        batch.list_inputs(str(imgs / "a" / "im00.png"), "image")


def test_video_inputs(tmp_path):
    clips = tmp_path / "clips"
    (clips / "sub" / "frames").mkdir(parents=True)
    (clips / "x.mp4").write_bytes(b"")
    (clips / "sub" / "y.mov").write_bytes(b"")
    (clips / "sub" / "readme.md").write_text("")
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(clips / "sub" / "frames" / f"{i}.jpg")
    assert batch.input_kind(str(clips / "sub" / "frames"), "video") == "single"  # a frame folder: one video
    assert batch.input_kind(str(clips), "video") == "folder"
    assert [it.rel for it in batch.list_inputs(str(clips), "video")] == ["sub/frames", "sub/y.mov", "x.mp4"]
    got = [it.rel for it in batch.list_inputs(str(clips / "sub" / "*"), "video")]
    assert got == ["frames", "readme.md", "y.mov"]  # a glob is taken as given: readme.md gets an error record


def test_atomic_writes_and_completeness(tmp_path):
    target = tmp_path / "d" / "x.png.json"

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write('{"half":')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        batch.write_atomic(str(target), failing)
    assert os.listdir(tmp_path / "d") == []  # neither the target nor the temporary file

    batch.write_json_atomic(str(target), {"image": "x", "instances": []})
    assert batch.is_complete(str(target))
    assert not batch.is_complete(str(target), str(tmp_path / "d" / "x.png.overlay.png"))  # overlay missing
    assert os.listdir(tmp_path / "d") == ["x.png.json"]

    bad = tmp_path / "d" / "y.png.json"
    for text in ('{"image": "y", "insta', "", "[1, 2]", '{"image": "y", "error": "boom"}'):
        bad.write_text(text)
        assert not batch.is_complete(str(bad))
    assert not batch.is_complete(str(tmp_path / "d" / "none.json"))

    # crashed writers' temporaries: only those of the given outputs go
    d = tmp_path / "d"
    mine = [d / ".x.png.json.partial-0123abcd.json", d / ".y.png.json.partial-deadbeef.json"]
    other = [d / ".z.png.json.partial-0123abcd.json", d / ".x.png.json.bak"]
    for p in mine + other:
        p.write_text("{")
    assert batch.clean_partials([str(target), str(bad)]) == 2
    assert sorted(os.listdir(d)) == sorted(["x.png.json", "y.png.json"] + [p.name for p in other])


# ----------------------------------------------------------------------------------------------
# One process


def test_folder_glob_list_jobs_rerun_and_bad_inputs(data, reference, tmp_path, capsys):
    imgs = data / "imgs"
    out = tmp_path / "folder"
    rc = main(["segment", str(imgs), *SEG, "--out", str(out), "--batch-size", "3"])
    err = capsys.readouterr().err
    assert rc == 1  # bad.png failed
    assert "21 input(s) [RANDOM WEIGHTS]: 0 already done, 21 to run" in err
    assert "21/21" in err and "sam3fast images" in err  # the progress bar
    assert "1 input(s) failed" in err and "bad.png" in err
    files = _outputs(out)
    assert sorted(files) == sorted([g + ".json" for g in GOOD] + ["bad.png.json"])
    rec = json.loads(files["bad.png.json"])
    assert rec["image"] == str(imgs / "bad.png") and "cannot identify image" in rec["error"]
    for g in GOOD:  # the same images in the same batches: the same bytes as the glob job
        assert files[g + ".json"] == reference[g + ".json"], g
    doc = json.loads(files["a/im00.png.json"])
    assert doc["random_weights"] is True and "RANDOM WEIGHTS" in doc["warning"]
    assert doc["image"] == str(imgs / "a" / "im00.png") and (doc["height"], doc["width"]) == (40, 50)
    assert {i["prompt"] for i in doc["instances"]} == {"cat", "dog"}  # both prompts, one backbone pass

    # a re-run: good outputs untouched, the error record retried (still failing: exit 1 again)
    stamp = {g: os.stat(out / (g + ".json")) for g in GOOD}
    rc = main(["segment", str(imgs), *SEG, "--out", str(out), "--batch-size", "3"])
    err = capsys.readouterr().err
    assert rc == 1 and "20 already done, 1 to run" in err
    for g in GOOD:
        st = os.stat(out / (g + ".json"))
        assert (st.st_ino, st.st_mtime_ns) == (stamp[g].st_ino, stamp[g].st_mtime_ns), g

    # a list file (with a missing entry) gives the same outputs under the same names
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(str(imgs / g) for g in GOOD) + "\n" + str(imgs / "missing.png") + "\n")
    out2 = tmp_path / "list"
    rc = main(["segment", "@" + str(lst), *SEG, "--out", str(out2), "--batch-size", "3"])
    err = capsys.readouterr().err
    assert rc == 1 and "missing.png" in err
    files2 = _outputs(out2)
    assert "error" in json.loads(files2.pop("missing.png.json"))
    assert files2 == {g + ".json": reference[g + ".json"] for g in GOOD}


def test_batch_argument_errors(data, tmp_path, capsys):
    imgs = data / "imgs"
    assert main(["segment", str(imgs / "*.jpg"), *SEG, "--out", str(tmp_path)]) == 2
    assert "no images found" in capsys.readouterr().err
    assert main(["segment", "@" + str(tmp_path / "nope.txt"), *SEG, "--out", str(tmp_path)]) == 2
    assert "list file not found" in capsys.readouterr().err
    assert main(["segment", str(imgs), *SEG, "--out", str(tmp_path), "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    assert main(["segment", str(imgs), "--prompt", " ", "--config", "tiny", "--random-weights"]) == 2
    assert main(["track", str(tmp_path / "*.mp4"), "--box", "1,2,3", "--config", "tiny", "--random-weights"]) == 2
    assert "--box" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_track_batch(tmp_path, capsys):
    from video_clip import make_clip, write_jpg_folder, write_mp4

    clips = tmp_path / "clips"
    (clips / "sub").mkdir(parents=True)
    write_mp4(make_clip(num_frames=5, height=40, width=56, seed=1), str(clips / "one.mp4"))
    write_mp4(make_clip(num_frames=4, height=40, width=56, seed=2), str(clips / "sub" / "one.mp4"))
    write_jpg_folder(make_clip(num_frames=4, height=40, width=56, seed=3), str(clips / "sub" / "frames"))
    (clips / "broken.mp4").write_bytes(b"garbage" * 10)
    out = tmp_path / "out"
    args = ["--prompt", "blob", "--config", "tiny", "--random-weights", "--out", str(out)]
    rc = main(["track", str(clips), *args, "--overlay"])
    err = capsys.readouterr().err
    assert rc == 1 and "broken.mp4" in err and "4/4" in err
    assert "propagate" not in err  # one bar for the job, none per video
    files = sorted(_outputs(out))
    assert files == sorted(["broken.mp4.json", "one.mp4.json", "one.mp4.overlay.mp4", "sub/one.mp4.json",
                            "sub/one.mp4.overlay.mp4", "sub/frames.json", "sub/frames.overlay.mp4"])
    assert "error" in json.loads((out / "broken.mp4.json").read_text())
    frames = json.loads((out / "sub" / "frames.json").read_text())
    assert frames["num_frames"] == 4 and [f["frame_index"] for f in frames["frames"]] == list(range(4))

    # a batch record holds what the single-input command writes for that video
    single = tmp_path / "single"
    assert main(["track", str(clips / "one.mp4"), *args[:-1], str(single)]) == 0
    capsys.readouterr()
    assert json.loads((out / "one.mp4.json").read_text()) == json.loads((single / "one_tracks.json").read_text())


# ----------------------------------------------------------------------------------------------
# Two ranks under torchrun (gloo)

_CRASHING_MAIN = """\
import os, sys
import sam3fast.batch as batch
from sam3fast.cli import main

written = [0]
real = batch.write_json_atomic

def crash_on_rank1(path, doc):
    # rank 1 dies after {k} outputs, in the middle of writing the next one, leaving a partial file
    if os.environ["RANK"] == "1" and written[0] == {k}:
        d, name = os.path.split(path)
        with open(os.path.join(d, "." + name + batch.PARTIAL_TAG + "0badf00d.json"), "w") as f:
            f.write('{{"image": "trunc')
        os._exit(3)
    written[0] += 1
    real(path, doc)

batch.write_json_atomic = crash_on_rank1
sys.exit(main(sys.argv[1:]))
"""


def _torchrun(script_args, tmp_path, log_name):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    logs = tmp_path / log_name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--log-dir", str(logs), "--redirects", "3", *script_args]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and its workers (their own session)
        out, err = p.communicate()
        pytest.fail(f"torchrun hung: {out}{err}")
    p = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    per_rank = {}
    for r in (0, 1):
        found = glob.glob(str(logs / "**" / str(r) / "stderr.log"), recursive=True)
        per_rank[r] = open(found[0]).read() if found else ""
    return p, per_rank


def test_two_ranks_crash_resume_identical_to_one_process(data, reference, tmp_path):
    out = tmp_path / "out"
    job = ["segment", str(data / "imgs" / "*" / "*.png"), *SEG, "--out", str(out), "--batch-size", "3",
           "--overlay"]
    # 20 images in 7 chunks of 3: rank 1 gets chunks 1, 3, 5 and dies in chunk 3 (after 4 outputs)
    script = tmp_path / "crashing_main.py"
    script.write_text(_CRASHING_MAIN.format(k=4))
    p, logs = _torchrun([str(script), *job], tmp_path, "logs1")
    assert p.returncode != 0, p.stdout + p.stderr
    after_crash = _outputs(out)
    partials = [f for f in after_crash if batch.PARTIAL_TAG in f]
    assert partials, sorted(after_crash)
    done = [f for f in after_crash if f.endswith(".json") and f not in partials]
    assert 4 <= len(done) < 20
    complete = [f for f in done if batch.is_complete(str(out / f), str(out / f[:-5]) + ".overlay.png")]
    stamp = {f: os.stat(out / f) for j in complete for f in (j, j[:-5] + ".overlay.png")}
    assert len(complete) >= 4

    p, logs = _torchrun(["-m", "sam3fast.cli", *job], tmp_path, "logs2")
    assert p.returncode == 0, p.stdout + p.stderr + logs[0] + logs[1]
    # rank 0 reports the whole job; rank 1 is quiet
    assert f"20 input(s) [RANDOM WEIGHTS]: {len(done)} already done, {20 - len(done)} to run on 2 ranks" in logs[0]
    assert "20/20" in logs[0] and "sam3fast images" in logs[0]
    assert logs[1].strip() == "", logs[1]
    files = _outputs(out)
    # every output exactly once, no temporary file left, the same bytes as one process
    assert files == reference
    # nothing complete before the resume was rewritten
    for f, st in stamp.items():
        now = os.stat(out / f)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f
