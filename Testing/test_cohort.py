"""attention-map cohort: a manifest explained on real Dask clusters (a LocalCluster, and a scheduler and workers
started as separate processes on loopback), real MONAI ViT cards, real files.

The tests that start separate processes and kill them (marked ``cohort``, about 1.5 min) run in their own CI step,
``make test-cohort``."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from monai.networks.nets import ViT

from AttentionMapLib.cli import main
from AttentionMapLib.cohort import read_manifest
from AttentionMapLib.errors import AttentionMapError
from AttentionMapLib.io import read_volume, write_volume
from test_cli import oblique_affine, vit_args, write_card

SHAPE = (48, 40, 20)
CASES = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A ViT card, six oblique volumes with labels and a file that is not a volume, and a CSV manifest of them
    with relative paths."""
    root = tmp_path_factory.mktemp("cohort")
    torch.manual_seed(0)
    card = write_card(root / "model", ViT(**vit_args(32)), vit_args(32))
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    lines = ["image,label,case_id"]
    for index in range(CASES):
        volume = rng.integers(-1000, 400, SHAPE).astype(np.int16)
        label = np.zeros(SHAPE, dtype=np.uint8)
        label[10 + index:20 + index, 8:20, 4:10] = 1
        write_volume(root / "images" / f"c{index}.nrrd", volume, oblique_affine())
        write_volume(root / "images" / f"c{index}_label.nrrd", label, oblique_affine())
        lines.append(f"images/c{index}.nrrd,images/c{index}_label.nrrd,")
    (root / "images" / "broken.nrrd").write_text("not a volume")
    lines.append("images/broken.nrrd,,broken")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root, card


def cohort(*argv) -> int:
    return main(["cohort", *[str(a) for a in argv]])


def table(out: Path):
    return pq.read_table(out / "cohort.parquet").to_pylist()


# ---------------------------------------------------------------------------------------------- manifests
def test_csv_and_json_lines_manifests_give_the_same_cases(data, tmp_path):
    root, _ = data
    from_csv = read_manifest(root / "manifest.csv")
    assert [c.case_id for c in from_csv] == [f"c{i}" for i in range(CASES)] + ["broken"]
    assert from_csv[0].image == str(root / "images" / "c0.nrrd") and from_csv[-1].label is None
    lines = [json.dumps({"image": str(c.image), **({"label": c.label} if c.label else {}), "case_id": c.case_id})
             for c in from_csv]
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n\n")
    assert read_manifest(tmp_path / "manifest.jsonl") == from_csv


@pytest.mark.parametrize("text,suffix,message", [
    ("path,label\na.nrrd,\n", ".csv", r"expected a CSV header row with an 'image' column"),
    ("image,lable\na.nrrd,b.nrrd\n", ".csv", r"line 2: unknown column\(s\) \['lable'\]"),
    ("image\na.nrrd\nsub/a.nrrd\n", ".csv", r"line 3: case_id 'a' is also on line 2"),
    ("image,case_id\na.nrrd,../up\n", ".csv", r"line 2: case_id '../up' cannot name a folder"),
    ("image,case_id\n,x\n", ".csv", r"line 2: no image"),
    ("image\n", ".csv", r"the manifest lists no case"),
    ('{"image": "a.nrrd"}\n{"image": \n', ".jsonl", r"line 2: not JSON"),
    ('["a.nrrd"]\n', ".jsonl", r"line 1: expected an object"),
])
def test_a_bad_manifest_gets_one_message_naming_its_line(tmp_path, text, suffix, message):
    path = tmp_path / f"manifest{suffix}"
    path.write_text(text)
    with pytest.raises(AttentionMapError, match=message):
        read_manifest(path)


# ---------------------------------------------------------------------------------------------- local cluster
def test_a_local_cohort_writes_each_case_as_run_does_records_the_broken_one_and_resumes(data, tmp_path, capsys):
    root, card = data
    out = tmp_path / "out"
    assert cohort(root / "manifest.csv", "--model", card, "--output-dir", out, "--workers", "2") == 1
    rows = {r["case_id"]: r for r in table(out)}
    assert [r["status"] for r in rows.values()] == ["ok"] * CASES + ["failed"]
    assert "broken.nrrd: SimpleITK could not read it as a volume" in rows["broken"]["error"]
    assert json.loads((out / "failed" / "broken.json").read_text())["status"] == "failed"
    # each case's folder holds what `run` writes for that one input, and the same map
    assert run_cli_single(root / "images" / "c3.nrrd", root / "images" / "c3_label.nrrd", card, tmp_path / "run")
    mine, _ = read_volume(out / "cases" / "c3" / "c3_attention.nrrd")
    theirs, _ = read_volume(tmp_path / "run" / "c3_attention.nrrd")
    np.testing.assert_allclose(mine, theirs, rtol=1e-5)
    summary = json.loads((out / "cases" / "c3" / "summary.json").read_text())
    assert summary["cases"][0]["outputs"]["attention"] == str(out / "cases" / "c3" / "c3_attention.nrrd")
    run_summary = json.loads((tmp_path / "run" / "summary.json").read_text())["cases"][0]
    assert rows["c3"]["label_mass_ratio"] == pytest.approx(run_summary["label"]["mass_ratio"], rel=1e-5)
    assert rows["c3"]["probability"] == pytest.approx(run_summary["prediction"]["probability"], rel=1e-5)
    # each worker loaded the model once and kept it
    loads = [r for r in rows.values() if r["status"] == "ok" and r["seconds_model_load"] > 0]
    assert 1 <= len(loads) <= len({r["worker"] for r in rows.values() if r["status"] == "ok"}) <= 2
    csv_lines = (out / "cohort.csv").read_text().splitlines()
    assert len(csv_lines) == CASES + 2 and csv_lines[0].startswith('"case_id","image"')
    page = (out / "summary.html").read_text()
    assert "ok: 6, failed: 1" in page and "broken.nrrd" in page and "data:image/png;base64," in page
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / ".partial").exists()
    # a rerun runs nothing; the broken case, mended, runs with --retry-failed
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cases").rglob("*")}
    capsys.readouterr()
    assert cohort(root / "manifest.csv", "--model", card, "--output-dir", out, "--workers", "1") == 1
    assert "6 finished earlier, 1 failed earlier" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (out / "cases").rglob("*")} == stamps
    mended = tmp_path / "mended"
    mended.mkdir()
    (mended / "manifest.csv").write_text(
        (root / "manifest.csv").read_text().replace("images/", f"{root}/images/").replace(
            f"{root}/images/broken.nrrd", f"{root}/images/c0.nrrd"))
    assert cohort(mended / "manifest.csv", "--model", card, "--output-dir", out, "--workers", "1",
                  "--retry-failed") == 0
    assert [r["status"] for r in table(out)] == ["ok"] * (CASES + 1)
    assert not (out / "failed" / "broken.json").exists()
    assert {p: p.stat().st_mtime_ns for p in (out / "cases").rglob("*") if p in stamps} == stamps


def run_cli_single(image: Path, label: Path, card: Path, out: Path) -> bool:
    return main(["run", str(image), "--label", str(label), "--model", str(card), "--output-dir", str(out)]) == 0


def test_bad_cohort_options_fail_once_before_any_worker_starts(data, tmp_path, capsys):
    root, card = data
    out = tmp_path / "out"
    assert cohort(root / "manifest.csv", "--model", card, "--output-dir", out, "--target", "tumour") == 2
    assert "--target" in capsys.readouterr().err and not out.exists()
    assert cohort(root / "manifest.csv", "--model", card, "--output-dir", out, "--workers", "0") == 2
    assert "--workers: expected 1 or more" in capsys.readouterr().err
    masks = tmp_path / "masks.csv"
    masks.write_text(f"image,mask\n{root}/images/c0.nrrd,{root}/images/c0_label.nrrd\n")
    assert cohort(masks, "--model", card, "--output-dir", out, "--roi", "none") == 2
    assert "--roi: the manifest also gives masks" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- separate processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DASK = [sys.executable, "-m", "dask"]


@pytest.fixture
def dask_cluster(tmp_path):
    """`dask scheduler` and `dask worker --nworkers 2` as separate processes on loopback; stopped afterwards."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = [open(tmp_path / name, "w") for name in ("scheduler.log", "worker.log")]
    scheduler = subprocess.Popen([*DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--no-dashboard"], stdout=logs[0], stderr=subprocess.STDOUT)
    worker = subprocess.Popen([*DASK, "worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard",
                               "--host", "127.0.0.1", "--local-directory", str(tmp_path / "dask")],
                              stdout=logs[1], stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        yield address, worker
    finally:
        for process in (worker, scheduler):
            process.terminate()
        for process in (worker, scheduler):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs:
            log.close()


def slow_options(card: Path) -> list:
    """Each case about a second or two: 8 flips x 8 half-patch shifts of the 32^3 ViT."""
    return ["--model", str(card), "--flip-average", "all", "--shift-average", "on"]


@pytest.mark.cohort
def test_a_worker_killed_mid_cohort_loses_only_its_case_which_is_retried(data, tmp_path, dask_cluster):
    """On a separately started scheduler and workers (--scheduler): a worker process is killed while it holds a
    case; that case runs again on another worker, every case finishes, the killed worker's staging folder is
    removed, and the same command again has nothing to run."""
    root, card = data
    address, _ = dask_cluster
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join((root / "manifest.csv").read_text().replace(
        "images/", f"{root}/images/").splitlines()[:-1]) + "\n")  # the six good cases
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "AttentionMapLib.cli", "cohort", str(manifest),
                                *slow_options(card), "--output-dir", str(out), "--scheduler", address],
                               stderr=subprocess.PIPE, text=True)
    from distributed import Client

    with Client(address, timeout="60s") as client:
        deadline, busy = time.time() + 120, {}
        while time.time() < deadline and not busy:  # a worker holding a case, as the scheduler sees it
            busy = {w: keys for w, keys in client.processing().items() if keys}
            time.sleep(0.05)
        assert busy, "no case ever ran"
        victim, keys = next(iter(busy.items()))
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
    lost = {str(key).split("-")[1] for key in keys}  # task keys: attentionmap-<case_id>-<random>
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    rows = {r["case_id"]: r for r in table(out)}
    assert [r["status"] for r in rows.values()] == ["ok"] * CASES
    assert lost and all(rows[case]["worker"] != victim for case in lost)  # finished again on another worker
    assert not (out / ".partial").exists()  # the killed worker's staging folder removed at the end
    again = subprocess.run([sys.executable, "-m", "AttentionMapLib.cli", "cohort", str(manifest),
                            *slow_options(card), "--output-dir", str(out), "--scheduler", address],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"{CASES} finished earlier, 0 failed earlier" in again.stderr


@pytest.mark.cohort
def test_ctrl_c_keeps_the_finished_cases_and_the_same_command_resumes(data, tmp_path):
    root, card = data
    out = tmp_path / "out"
    command = [sys.executable, "-m", "AttentionMapLib.cli", "cohort", str(root / "manifest.csv"),
               *slow_options(card), "--output-dir", str(out), "--workers", "1"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list((out / "cases").glob("*/row.json")):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted (Ctrl-C): the cases that finished are kept" in err
    rows = table(out)
    finished = [r["case_id"] for r in rows if r["status"] == "ok"]
    assert 1 <= len(finished) < CASES and {r["status"] for r in rows} <= {"ok", "not run", "failed"}
    assert sorted(p.name for p in (out / "cases").iterdir()) == sorted(finished)
    again = subprocess.run(command, stderr=subprocess.PIPE, text=True, timeout=300)
    assert again.returncode == 1 and f"{len(finished)} finished earlier" in again.stderr
    assert [r["status"] for r in table(out)] == ["ok"] * CASES + ["failed"]
