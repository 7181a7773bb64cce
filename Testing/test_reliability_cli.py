"""Reliability sweep, command line: bad inputs, hostile output folders, hostile model files, faults.

Every refused case asserts the exact exit status, one line on stderr naming the input / output / field,
and that nothing under the test's folder changed (inputs, card, planted links and their targets,
earlier outputs: sha256 of every file) and no staging folder or partial file is left. Faults that
need a real process (named pipes that would block, a full disk, SIGTERM, Ctrl-C) run the CLI as a
subprocess; the rest call `main` in-process (same code, no interpreter start-up).
"""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from AttentionMapLib.cli import main
from AttentionMapLib.errors import AttentionMapError
from AttentionMapLib.io import write_volume
from AttentionMapLib.outputs import STAGING_PREFIX, stop_signals_held
from reliability import (
    card_dict,
    cli_subprocess,
    leftovers,
    oblique_affine,
    one_line,
    run_cli_subprocess,
    scan_array,
    snapshot,
)
from test_io import _write_dicom_series

SHAPE = scan_array().shape


def _volume(w, name, array, affine=None):
    path = w.root / name
    write_volume(path, array, oblique_affine() if affine is None else affine)
    return path


def _text(w, name, data=b"not a volume"):
    path = w.root / name
    path.write_bytes(data)
    return path


def _vector(w):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.zeros((*SHAPE[::-1], 3), np.uint8), isVector=True)
    sitk.WriteImage(image, str(w.root / "rgb.nrrd"))
    return w.root / "rgb.nrrd"


def _run(w, *extra):
    return ["run", w.image, "--model", w.card, "--output-dir", w.out, *extra]


def _card(w, **changes):
    w.card.write_text(json.dumps(card_dict(**changes)))
    return _run(w)


def _two_series(w):
    folder = w.root / "dicom"
    folder.mkdir()
    import SimpleITK as sitk

    image = sitk.ReadImage(str(w.image))
    _write_dicom_series(folder, image, series="1.2.826.0.1.3680043.2.1125.1.99.1")
    image.SetOrigin((0.0, 0.0, 500.0))
    _write_dicom_series(folder, image, series="1.2.826.0.1.3680043.2.1125.1.99.2")
    return folder


def _lung_scans(w):
    """scans/lung.nrrd and scans/lung_attention.nrrd (an earlier result, now an input) -> --output-dir scans."""
    shutil.copy(w.image, w.inp / "lung.nrrd")
    shutil.copy(w.image, w.inp / "lung_attention.nrrd")
    return ["run", w.inp / "lung.nrrd", w.inp / "lung_attention.nrrd", "--model", w.card, "--output-dir", w.inp]


def _planted_link(w, name, target):
    w.out.mkdir()
    (w.out / name).symlink_to(target)
    return _run(w)


class _Payload:
    """Pickled, this calls os.system("touch MARKER") when unpickled by an unsafe loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _pickle_weights(w):
    torch.save({"weights": torch.zeros(2), "payload": _Payload(w.root / "MARKER")}, w.card.parent / "weights.pt")
    return _run(w)


def _bundle(w):
    folder = w.root / "bundle"
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    shutil.copy(w.card.parent / "weights.pt", folder / "models" / "model.pt")
    config = {"marker": f"$__import__('os').system('touch {w.root / 'MARKER'}')",
              "network_def": {"_target_": "monai.networks.nets.ViT", "in_channels": 1, "img_size": 16,
                              "patch_size": 8, "hidden_size": 8, "mlp_dim": 8, "num_layers": 1, "num_heads": 2}}
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    return ["run", w.image, "--model", folder, "--output-dir", w.out]


def _truncated(w, name):
    data = (w.card.parent / "weights.pt").read_bytes()
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(torch.load(w.card.parent / "weights.pt", weights_only=True), str(w.card.parent / name))
        data = (w.card.parent / name).read_bytes()
    (w.card.parent / name).write_bytes(data[: len(data) // 2])
    return _card(w, weights=name)


def _score(w, output):
    return ["score", w.image, "--model", w.card, "--steps", "2", "--output", output]


def _nan(w, value):
    array = scan_array().astype(np.float32)
    array[3, 4, 5] = value
    return ["run", _volume(w, "bad.nrrd", array), "--model", w.card, "--output-dir", w.out]


# name -> (setup(w) -> argv, exit status, words the one line must hold (callables get w))
CASES = {
    # ---- inputs: kind of file
    "input missing": (
        lambda w: ["run", w.root / "absent.nrrd", "--model", w.card, "--output-dir", w.out],
        2,
        ["absent.nrrd: no such file or folder"],
    ),
    "input empty file": (
        lambda w: ["run", _text(w, "empty.nrrd", b""), "--model", w.card, "--output-dir", w.out],
        2,
        ["empty.nrrd: the file is empty"],
    ),
    "input not a volume": (
        lambda w: ["run", _text(w, "notes.nrrd"), "--model", w.card, "--output-dir", w.out],
        2,
        ["notes.nrrd: SimpleITK could not read it"],
    ),
    "input gzip junk": (
        lambda w: ["run", _text(w, "junk.nii.gz", b"\x1f\x8b\x08junk"), "--model", w.card, "--output-dir", w.out],
        2,
        ["junk.nii.gz: SimpleITK could not read it"],
    ),
    "input is a device": (
        lambda w: ["run", "/dev/null", "--model", w.card, "--output-dir", w.out],
        2,
        ["/dev/null: is a device; expected a regular file or a DICOM folder"],
    ),
    "input folder without DICOM": (
        lambda w: ["run", w.inp, "--model", w.card, "--output-dir", w.out],
        2,
        ["inp: no DICOM series found in this folder"],
    ),
    # ---- inputs: content (the message names the file, not the library's argument)
    "input 2D": (
        lambda w: [
            "run",
            _volume(w, "flat.nrrd", np.zeros((20, 16, 1), np.int16)),
            "--model",
            w.card,
            "--output-dir",
            w.out,
        ],
        2,
        ["flat.nrrd: got shape (20, 16, 1) (a 2D image)"],
    ),
    "input 1x1x1": (
        lambda w: [
            "run",
            _volume(w, "dot.nrrd", np.zeros((1, 1, 1), np.int16)),
            "--model",
            w.card,
            "--output-dir",
            w.out,
        ],
        2,
        ["dot.nrrd: got shape (1, 1, 1) (3 of its 3 axes hold a single voxel)"],
    ),
    "input NaN": (lambda w: _nan(w, np.nan), 2, ["bad.nrrd: 1 NaN or infinite voxel(s)"]),
    "input Inf": (lambda w: _nan(w, np.inf), 2, ["bad.nrrd: 1 NaN or infinite voxel(s)"]),
    "input vector": (
        lambda w: ["run", _vector(w), "--model", w.card, "--output-dir", w.out],
        2,
        ["rgb.nrrd: got shape (3, 20, 16, 12); the model expects 1 channel(s)"],
    ),
    "label count": (lambda w: _run(w, "--label", w.label, w.label), 2, ["--label: got 2 mask(s) for 1 input(s)"]),
    "input smaller than a patch": (
        lambda w: _card(w, preprocessing={**card_dict()["preprocessing"], "spacing": [4, 4, 4]}),
        2,
        ["case1.nrrd: after resampling the volume is (7, 4, 9) voxels"],
    ),
    "second input bad": (
        lambda w: ["run", w.image, _nan(w, np.inf)[1], "--model", w.card, "--output-dir", w.out],
        2,
        ["bad.nrrd: 1 NaN or infinite voxel(s)"],
    ),
    "duplicate case names": (
        lambda w: [
            "run",
            w.image,
            shutil.copy(w.image, w.root / "case1.nrrd"),
            "--model",
            w.card,
            "--output-dir",
            w.out,
        ],
        2,
        ["case1: several inputs share this case name"],
    ),
    "two DICOM series": (
        lambda w: ["run", _two_series(w), "--model", w.card, "--output-dir", w.out],
        2,
        ["dicom: 2 DICOM series found; choose one with --series-uid UID"],
    ),
    "unknown series UID": (
        lambda w: ["run", _two_series(w), "--series-uid", "1.2.3", "--model", w.card, "--output-dir", w.out],
        2,
        ["dicom: DICOM series '1.2.3' not found"],
    ),
    "series UID for a file": (
        lambda w: _run(w, "--series-uid", "1.2.3"),
        2,
        ["case1.nrrd: a series UID was given but the input is a file"],
    ),
    "label other grid": (
        lambda w: _run(w, "--label", _volume(w, "small.nrrd", np.ones((8, 8, 8), np.uint8))),
        2,
        ["small.nrrd: the mask's voxel grid (shape (8, 8, 8)) differs from"],
    ),
    "label empty": (
        lambda w: _run(w, "--label", _volume(w, "zero.nrrd", np.zeros(SHAPE, np.uint8))),
        2,
        ["zero.nrrd: the mask is empty"],
    ),
    "label is a device": (lambda w: _run(w, "--label", "/dev/zero"), 2, ["/dev/zero: is a device"]),
    # ---- options
    "head out of range": (lambda w: _run(w, "--head", "7"), 2, ["head: expected 0..1 (the model has 2 heads), got 7"]),
    "discard ratio": (lambda w: _run(w, "--discard-ratio", "1.5"), 2, ["discard_ratio: expected a value in [0, 1)"]),
    "target not a class": (lambda w: _run(w, "--target", "tumour"), 2, ["--target: target 'tumour' is not a class"]),
    # ---- output folder
    "output dir is a file": (
        lambda w: ["run", w.image, "--model", w.card, "--output-dir", w.label],
        2,
        ["--output-dir", "case1_label.nrrd: exists and is not a folder"],
    ),
    "output dir is a link to a file": (
        lambda w: ["run", w.image, "--model", w.card, "--output-dir", _planted_link(w, "x", w.image)[-1] / "x"],
        2,
        ["out/x: exists and is not a folder"],
    ),
    "output dir on a read-only file system": (
        lambda w: ["run", w.image, "--model", w.card, "--output-dir", "/sys/attention-map-out"],
        2,
        ["--output-dir /sys/attention-map-out: cannot write in /sys"],
    ),
    "output name is an input": (
        _lung_scans,
        2,
        ["lung_attention.nrrd: is the input", "refusing to overwrite an input"],
    ),
    "label is an output name": (
        lambda w: [
            "run",
            w.image,
            "--label",
            shutil.copy(w.label, w.inp / "case1_attention.nrrd"),
            "--model",
            w.card,
            "--output-dir",
            w.inp,
        ],
        2,
        ["inp/case1_attention.nrrd: is the input"],
    ),
    "card is an output name": (
        lambda w: [
            "run",
            w.image,
            "--model",
            shutil.copy(w.card, w.card.parent / "summary.json"),
            "--output-dir",
            w.card.parent,
        ],
        2,
        ["summary.json: is the input"],
    ),
    "output dir inside a DICOM input": (
        lambda w: [
            "run",
            _two_series(w),
            "--series-uid",
            "1.2.826.0.1.3680043.2.1125.1.99.1",
            "--model",
            w.card,
            "--output-dir",
            w.root / "dicom" / "maps",
        ],
        2,
        ["maps: lies inside the input folder"],
    ),
    "planted link summary.json -> CT": (
        lambda w: _planted_link(w, "summary.json", w.image),
        2,
        ["out/summary.json: is a symbolic link; refusing to write through it"],
    ),
    "planted link attention.nrrd -> CT": (
        lambda w: _planted_link(w, "case1_attention.nrrd", w.image),
        2,
        ["case1_attention.nrrd: is a symbolic link"],
    ),
    "planted link overlay.png -> card": (
        lambda w: _planted_link(w, "case1_overlay.png", w.card),
        2,
        ["case1_overlay.png: is a symbolic link"],
    ),
    "planted dangling link": (
        lambda w: _planted_link(w, "summary.json", w.root / "created-through-link"),
        2,
        ["summary.json: is a symbolic link"],
    ),
    "folder named summary.json": (
        lambda w: (w.out.mkdir(), (w.out / "summary.json").mkdir(), _run(w))[-1],
        2,
        ["summary.json: exists and is not a regular file"],
    ),
    # ---- score --output
    "score output is a folder": (lambda w: _score(w, w.inp), 2, ["--output", "inp: exists and is not a regular file"]),
    "score output is a link": (
        lambda w: _score(w, _planted_link(w, "s.json", w.image)[-1] / "s.json"),
        2,
        ["s.json: is a symbolic link"],
    ),
    "score output is the input": (lambda w: _score(w, w.image), 2, ["case1.nrrd: is the input"]),
    "score output in a missing folder": (
        lambda w: _score(w, w.root / "nowhere" / "s.json"),
        2,
        ["nowhere/s.json: the folder", "does not exist"],
    ),
    # ---- hostile or broken model files
    "pickle payload weights": (_pickle_weights, 2, ["weights.pt: refused, the file needs unpickling"]),
    "bundle expression untrusted": (_bundle, 2, ["bundle: MONAI bundle configs can run Python code", "--trust-bundle"]),
    "weights outside the card folder": (
        lambda w: _card(w, weights="../inp/case1.nrrd"),
        2,
        ["card.json: weights: '../inp/case1.nrrd' resolves to", "outside the card's folder"],
    ),
    "weights absolute path": (
        lambda w: _card(w, weights=str(w.image)),
        2,
        ["card.json: weights:", "is an absolute path"],
    ),
    "weights link out of the folder": (
        lambda w: ((w.card.parent / "w.pt").symlink_to(w.image), _card(w, weights="w.pt"))[-1],
        2,
        ["card.json: weights: 'w.pt' resolves to", "outside the card's folder"],
    ),
    "truncated safetensors": (
        lambda w: _truncated(w, "half.safetensors"),
        2,
        ["half.safetensors: not a readable safetensors file"],
    ),
    "truncated checkpoint": (lambda w: _truncated(w, "half.pt"), 2, ["half.pt: not a readable PyTorch checkpoint"]),
    "card num_heads 0": (
        lambda w: _card(w, network={"name": "ViT", "args": {**card_dict()["network"]["args"], "num_heads": 0}}),
        2,
        ["card.json: network.args.num_heads: expected an integer in 1..1024, got 0"],
    ),
    "card huge hidden_size": (
        lambda w: _card(
            w, network={"name": "ViT", "args": {**card_dict()["network"]["args"], "hidden_size": 60000, "num_heads": 1}}
        ),
        2,
        ["card.json: network.args (hidden_size=60000", "the limit is 8 GiB"],
    ),
    "model folder is not a bundle": (
        lambda w: ["run", w.image, "--model", w.inp, "--output-dir", w.out],
        2,
        ["inp: not a MONAI bundle"],
    ),
    "sample-data cache is a file": (
        lambda w: ["sample-data", "--cache-dir", w.image],
        2,
        ["--cache-dir", "case1.nrrd: cannot be used as the sample-data cache"],
    ),
    "sample-data cache on a read-only file system": (
        lambda w: ["sample-data", "--cache-dir", "/sys/attention-map-cache"],
        2,
        ["--cache-dir /sys/attention-map-cache: cannot be used"],
    ),
    "model is a device": (
        lambda w: ["run", w.image, "--model", "/dev/zero", "--output-dir", w.out],
        2,
        ["/dev/zero: is a device"],
    ),
}


def _words(w, words):
    return [str(word(w)) if callable(word) else word for word in words]


@pytest.mark.parametrize("name", list(CASES))
def test_refused_with_one_line_and_nothing_changed(name, work, capfd):
    setup, status, words = CASES[name]
    argv = setup(work)
    before = snapshot(work.root)
    assert main([str(a) for a in argv]) == status
    line = one_line(capfd.readouterr().err)
    assert line.startswith("attention-map: error: ")
    for word in _words(work, words):
        assert word in line, (word, line)
    assert snapshot(work.root) == before  # inputs, card, planted links and their targets: unchanged
    assert leftovers(work.root) == [] and not (work.root / "MARKER").exists()


# ---- outcomes that succeed: how an existing output folder is treated

def test_existing_output_folder_gets_this_runs_files_and_keeps_the_others(work, capfd):
    work.out.mkdir()
    (work.out / "notes.txt").write_text("mine")
    (work.out / "summary.json").write_text("{\"earlier\": true}")
    before_inputs = snapshot(work.inp)
    assert main(["run", str(work.image), "--model", str(work.card), "--output-dir", str(work.out)]) == 0
    assert sorted(p.name for p in work.out.iterdir()) == [
        "case1_attention.nrrd", "case1_overlay.png", "notes.txt", "summary.json"]
    assert (work.out / "notes.txt").read_text() == "mine"  # not this run's: untouched
    assert json.loads((work.out / "summary.json").read_text())["cases"][0]["case"] == "case1"  # replaced
    summary = json.loads((work.out / "summary.json").read_text())
    assert summary["cases"][0]["outputs"]["attention"] == str(work.out / "case1_attention.nrrd")  # final, not staged
    assert snapshot(work.inp) == before_inputs and leftovers(work.root) == []


def test_new_nested_output_folder_is_created_with_the_usual_mode(work):
    target = work.root / "a" / "b" / "out"
    assert main(["run", str(work.image), "--model", str(work.card), "--output-dir", str(target)]) == 0
    assert sorted(p.name for p in target.iterdir()) == ["case1_attention.nrrd", "case1_overlay.png", "summary.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # not the staging folder's private 0700
    assert leftovers(work.root) == []


def test_output_folder_may_be_the_input_folder_when_no_name_collides(work):
    before = snapshot(work.inp)
    assert main(["run", str(work.image), "--model", str(work.card), "--output-dir", str(work.inp)]) == 0
    after = snapshot(work.inp)
    assert {k: v for k, v in after.items() if k in before} == before  # inputs unchanged, results added
    assert set(after) - set(before) == {"case1_attention.nrrd", "case1_overlay.png", "summary.json"}


def test_series_uid_picks_one_of_two_dicom_series(work):
    folder = _two_series(work)
    before = snapshot(folder)
    assert main(["run", str(folder), "--series-uid", "1.2.826.0.1.3680043.2.1125.1.99.2", "--model", str(work.card),
                 "--output-dir", str(work.out)]) == 0
    assert json.loads((work.out / "summary.json").read_text())["cases"][0]["case"] == "dicom"
    assert snapshot(folder) == before


# ---- faults that need a real process

def _fifo(w, name):
    path = w.root / name
    os.mkfifo(path)
    return path


def _weights_fifo(w):
    os.unlink(w.card.parent / "weights.pt")
    os.mkfifo(w.card.parent / "weights.pt")
    return _run(w)


FIFO_CASES = {
    "input": lambda w: (["run", _fifo(w, "stream.nrrd"), "--model", w.card, "--output-dir", w.out], "stream.nrrd"),
    "label": lambda w: (_run(w, "--label", _fifo(w, "mask.nrrd")), "mask.nrrd"),
    "card": lambda w: (["run", w.image, "--model", _fifo(w, "card.json"), "--output-dir", w.out], "card.json"),
    "weights": lambda w: (_weights_fifo(w), "weights.pt"),
}


@pytest.mark.parametrize("kind", list(FIFO_CASES))
def test_named_pipe_is_refused_without_blocking(kind, work):
    """What `<(zcat scan.nii.gz)` gives: the reader would block forever on open(); refused unopened."""
    argv, name = FIFO_CASES[kind](work)
    before = snapshot(work.root)
    done = run_cli_subprocess(argv, timeout=60)
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert f"{name}: is a named pipe" in line, line
    assert snapshot(work.root) == before and leftovers(work.root) == []


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("earlier_results", [False, True], ids=["new folder", "folder with earlier results"])
def test_full_disk_leaves_nothing_partial(work, earlier_results):
    """A full disk simulated with a real file-size limit (RLIMIT_FSIZE: writes past 4 KiB fail with EFBIG,
    as ENOSPC would): the NRRD grid fits, the overlay PNG does not."""
    if earlier_results:
        work.out.mkdir()
        (work.out / "case1_overlay.png").write_bytes(b"earlier overlay")
    before = snapshot(work.root)
    done = run_cli_subprocess(_run(work), timeout=120, preexec=_file_size_limit(4096))
    assert done.returncode == 2, done.stderr
    line = one_line(done.stderr)
    assert f"{work.out / 'case1_overlay.png'}: could not write (File too large)" in line, line
    assert snapshot(work.root) == before and leftovers(work.root) == []


def _wait_for_first_output(process, root: Path, timeout: float = 60.0) -> None:
    """Until the staging folder holds the first case's map (eleven cases and all overlays still to come)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and process.poll() is None:
        if list(root.glob(f"{STAGING_PREFIX}*/*_attention.nrrd")):
            return
        time.sleep(0.005)
    raise AssertionError("the run never started writing")


@pytest.mark.parametrize("sig, status, words", [
    (signal.SIGTERM, 143, "terminated (SIGTERM); no outputs of this run were kept"),
    (signal.SIGINT, 130, "interrupted (Ctrl-C); no outputs of this run were kept"),
], ids=["SIGTERM", "Ctrl-C"])
def test_killed_mid_run_leaves_nothing(work, sig, status, words):
    """Killed while the run writes (twelve cases, so the staging folder lives for seconds)."""
    inputs = [shutil.copy(work.image, work.inp / f"copy{i}.nrrd") for i in range(12)]
    # Ctrl-C reaches a command run from a terminal; a test run started in the background (nohup, `cmd &` in a
    # script) hands its children SIGINT ignored, and Python keeps it ignored: give the CLI the terminal's default.
    process = cli_subprocess(["run", *inputs, "--model", work.card, "--output-dir", work.root],
                             preexec=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_first_output(process, work.root)
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == status
    assert one_line(err) == f"attention-map: {words}"
    assert leftovers(work.root) == [] and not list(work.root.glob("*_attention.nrrd"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_a_stop_during_the_final_moves_is_held_and_dropped(sig):
    """The final renames cannot be cut in half: a stop arriving then is neither delivered nor left pending."""
    def refuse(signum, frame):
        raise AssertionError(f"signal {signum} was delivered during the final moves")

    previous = signal.signal(sig, refuse)
    try:
        with stop_signals_held():
            os.kill(os.getpid(), sig)
            time.sleep(0.05)
        time.sleep(0.05)  # nothing pending: the handler is not called after the hold either
        assert signal.getsignal(sig) is refuse
    finally:
        signal.signal(sig, previous)


def test_an_internal_fault_is_one_line_with_exit_1_and_a_traceback_on_request(work, capfd, monkeypatch):
    """A fault of ours (not bad input), simulated in our own reader: one line, exit 1; the variable shows it."""
    def broken(*args, **kwargs):
        raise RuntimeError("unexpected state")

    monkeypatch.setattr("AttentionMapLib.cli.plan_cases", broken)
    assert main([str(a) for a in _run(work)]) == 1
    assert one_line(capfd.readouterr().err) == ("attention-map: internal error: RuntimeError: unexpected state "
                                                "(set ATTENTIONMAP_TRACEBACK=1 for the traceback)")
    monkeypatch.setenv("ATTENTIONMAP_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="unexpected state"):
        main([str(a) for a in _run(work)])


def test_staging_folders_of_runs_killed_outright_are_removed_by_the_next_run(work):
    """SIGKILL or the out-of-memory killer leave the hidden staging folder with its staged overlays; the next run
    into the same place removes this user's staging folders whose run is gone, never a running one's."""
    from AttentionMapLib import stale
    from AttentionMapLib.outputs import STAGING_PREFIX

    work.out.mkdir()
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    left = work.out / f"{STAGING_PREFIX}killed"
    running = work.out / f"{STAGING_PREFIX}running"
    for folder, owner in ((left, killed.pid), (running, os.getpid())):
        folder.mkdir(mode=0o700)
        (folder / "case1_overlay.png").write_bytes(b"staged patient picture")
        stale.mark_owner(folder, owner)
    assert main(["run", str(work.image), "--model", str(work.card), "--output-dir", str(work.out)]) == 0
    assert not left.exists() and running.exists()
    assert sorted(p.name for p in work.out.iterdir() if p != running) == [
        "case1_attention.nrrd", "case1_overlay.png", "summary.json"]  # no owner file came along


@pytest.mark.parametrize("existing", [True, False], ids=["existing output folder", "new output folder"])
def test_a_folder_swapped_for_a_link_during_the_run_is_never_followed(tmp_path, existing):
    """The output folder (or, for a new one, its parent) is replaced by a link to another folder while the run
    computes: the final moves used to follow it; now the run is refused and nothing lands anywhere."""
    from AttentionMapLib.outputs import staged_folder

    parent = tmp_path / "parent"
    parent.mkdir()
    target = parent / "out"
    if existing:
        target.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    swapped = target if existing else parent
    with pytest.raises(AttentionMapError, match="was replaced .* while the run computed; nothing was written"):
        with staged_folder(target, ["summary.json"], []) as staging:
            (staging / "summary.json").write_text("{}")
            swapped.rename(tmp_path / "moved")
            swapped.symlink_to(elsewhere)
    assert list(elsewhere.iterdir()) == []
    moved = tmp_path / "moved"
    assert not list(moved.rglob("summary.json")) and not [p for p in moved.rglob(".attention-map-*")]


def test_an_output_folder_of_another_user_is_refused(work):
    work.out.mkdir()
    os.chown(work.out, 12345, 12345)  # as another user made it beforehand (the tests run as root)
    from AttentionMapLib.outputs import staged_folder

    with pytest.raises(AttentionMapError, match="belongs to another user \\(uid 12345\\)"):
        with staged_folder(work.out, ["summary.json"], []):
            pass
    assert list(work.out.iterdir()) == []


def test_a_new_output_folder_below_a_linked_parent_the_user_named_is_written(work, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    target = tmp_path / "link" / "a" / "b"
    assert main(["run", str(work.image), "--model", str(work.card), "--output-dir", str(target)]) == 0
    assert sorted(p.name for p in (real / "a" / "b").iterdir()) == [
        "case1_attention.nrrd", "case1_overlay.png", "summary.json"]
