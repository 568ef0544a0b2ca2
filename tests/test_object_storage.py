"""Data in object storage: ``--data s3://...`` against a real S3-compatible server (moto's
server mode, started here on localhost) gives the numbers of a local run on the same files,
and the credentials never reach a message or a report. The Ray workers reading the same
URIs are checked in tests/test_ray.py."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sp2ps_onnx import InputDataError
from sp2ps_onnx.data import open_data, redact
from sp2ps_onnx.scoring import DataOptions, MetricOptions, RunOptions, score_models

MODELS = Path(__file__).resolve().parent.parent / "models"
ORIGINAL = MODELS / "fmnist_cnn.onnx"
PRUNED = [MODELS / "pruned" / "fmnist_cnn_mag80.onnx", MODELS / "keras" / "fmnist_keras_mag70.onnx"]
FOLDER = MODELS / "samples" / "fmnist_png"
NPZ = MODELS / "samples" / "fmnist_test.npz"
CLASSES = MODELS / "samples" / "classes.txt"
BUCKET = "sp2ps-data"
SECRET = "s3cr3t-never-shown"


def s3_server() -> Iterator[dict | None]:
    """A moto S3 server on localhost holding the bundled PNG folder, the bundled (compressed)
    .npz, and float inputs as an uncompressed .npz and an .npy; the AWS_* variables point
    every reader (and Ray workers started afterwards) at it. ``None`` without moto."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    variables = {"AWS_ACCESS_KEY_ID": "sp2ps-test", "AWS_SECRET_ACCESS_KEY": SECRET,
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        for path in sorted(FOLDER.rglob("*.png")):
            client.upload_file(str(path), BUCKET, f"val/{path.relative_to(FOLDER).as_posix()}")
        client.upload_file(str(NPZ), BUCKET, "arrays/fmnist_test.npz")
        client.upload_file(str(CLASSES), BUCKET, "classes.txt")
        good = (FOLDER / "Bag" / sorted(p.name for p in (FOLDER / "Bag").iterdir())[0])
        client.upload_file(str(good), BUCKET, "broken/Bag/good.png")
        client.put_object(Bucket=BUCKET, Key="broken/Coat/cut.png",
                          Body=good.read_bytes()[:40])
        archive = np.load(NPZ)
        floats = (archive["x"][:24, None] / np.float32(255)).astype(np.float32)
        local = Path(os.environ.get("TMPDIR", "/tmp")) / f"sp2ps-s3-{port}"
        local.mkdir(exist_ok=True)
        np.savez(local / "floats.npz", x=floats, y=archive["y"][:24])
        np.save(local / "floats.npy", floats)
        for name in ("floats.npz", "floats.npy"):
            client.upload_file(str(local / name), BUCKET, f"arrays/{name}")
        yield {"endpoint": variables["AWS_ENDPOINT_URL"], "local": local}
        shutil.rmtree(local, ignore_errors=True)
    finally:
        server.stop()
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


s3 = pytest.fixture(scope="module")(s3_server)


def need(store: dict | None) -> dict:
    if store is None:
        pytest.skip("moto[server] is not installed (the test extra)")
    return store


OPTIONS = dict(data_options=DataOptions(preset="unit", limit=48),
               metric=MetricOptions(n_bootstrap=100, seed=3, examples=2),
               run=RunOptions(batch_size=8))


def assert_same(local, remote) -> None:
    """The same rows (ids, labels, every number) and the same aggregates."""
    assert remote.n == local.n and remote.class_names == local.class_names
    for a, b in zip(local.models, remote.models, strict=True):
        assert list(a.rows) == list(b.rows)
        assert a.result.to_dict() == b.result.to_dict()


def test_an_s3_image_folder_scores_as_the_same_local_folder(s3) -> None:
    need(s3)
    local = score_models(ORIGINAL, PRUNED, FOLDER, **OPTIONS)
    remote = score_models(ORIGINAL, PRUNED, f"s3://{BUCKET}/val", **OPTIONS)
    assert remote.config["data"] == f"s3://{BUCKET}/val"
    assert {row["id"].split("/")[0] for row in remote.models[0].rows} <= set(remote.class_names)
    assert_same(local, remote)


@pytest.mark.parametrize("name", ["fmnist_test.npz", "floats.npz", "floats.npy"])
def test_s3_arrays_score_as_the_same_local_files(s3, name) -> None:
    store = need(s3)
    path = NPZ if name == "fmnist_test.npz" else store["local"] / name
    local = score_models(ORIGINAL, PRUNED[:1], path, **OPTIONS)
    remote = score_models(ORIGINAL, PRUNED[:1], f"s3://{BUCKET}/arrays/{name}", **OPTIONS)
    assert_same(local, remote)


def test_file_uris_read_as_local_paths(tmp_path) -> None:
    local, remote = open_data(FOLDER), open_data(FOLDER.as_uri())
    assert local.class_names == remote.class_names
    for a, b in zip(local.batches(16), remote.batches(16), strict=True):
        assert a.ids == b.ids and np.array_equal(a.labels, b.labels)
        assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images, strict=True))


def test_credentials_are_never_shown(s3, tmp_path) -> None:
    need(s3)
    uri = f"s3://sp2ps-test:{SECRET}@{BUCKET}/val"
    assert SECRET not in redact(uri) and redact(uri) == f"s3://***@{BUCKET}/val"
    report = score_models(ORIGINAL, PRUNED[:1], uri, **OPTIONS)
    assert SECRET not in json.dumps(report.config, default=str)
    assert report.n == 48
    with pytest.raises(InputDataError) as missing:
        open_data(f"s3://sp2ps-test:{SECRET}@{BUCKET}/no-such-folder")
    assert SECRET not in str(missing.value) and "does not exist" in str(missing.value)
    with pytest.raises(InputDataError) as unknown:
        open_data(f"nosuchscheme://user:{SECRET}@host/x")
    assert SECRET not in str(unknown.value) and "nosuchscheme://***@host/x" in str(unknown.value)


def test_a_corrupt_file_in_the_bucket_is_a_listed_fault(s3) -> None:
    need(s3)
    source = open_data(f"s3://{BUCKET}/broken")
    assert [i for batch in source.batches(4) for i in batch.ids] == ["Bag/good.png"]
    assert [f.id for f in source.faults] == ["Coat/cut.png"]
    assert f"s3://{BUCKET}/broken/Coat/cut.png" in source.faults[0].reason
    with pytest.raises(InputDataError, match="cut.png"):
        list(open_data(f"s3://{BUCKET}/broken", strict=True).batches(4))


def test_a_class_list_in_the_bucket_orders_the_labels(s3) -> None:
    need(s3)
    local = open_data(FOLDER, classes=str(CLASSES))
    remote = open_data(f"s3://{BUCKET}/val", classes=f"s3://{BUCKET}/classes.txt")
    assert remote.class_names == local.class_names == CLASSES.read_text().split()
    assert remote.class_names != sorted(remote.class_names)  # the file's order, not sorted
    ours, theirs = next(local.batches(100)), next(remote.batches(100))
    assert ours.ids == theirs.ids and np.array_equal(ours.labels, theirs.labels)
    with pytest.raises(InputDataError, match=f"--classes s3://{BUCKET}/typo.txt"):
        open_data(f"s3://{BUCKET}/val", classes=f"s3://{BUCKET}/typo.txt")
