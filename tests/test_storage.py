"""Remote workdirs: train -> resume -> eval with the workdir on gs://, offline.

A Cloud Storage emulator (gcp-storage-emulator, in memory, on 127.0.0.1) stands in for
GCS: epath reaches it through gcsfs (STORAGE_EMULATOR_HOST) and Orbax's TensorStore
arrays through TensorStore's gcs kvstore (TENSORSTORE_GCS_HTTP_URL). The test runs in an
empty current directory, so any code path that fell back to open() / pathlib would leave
a local `gs:` folder there (pathlib.Path("gs://b/r") is the relative path gs:/b/r).
Needs the `gcs` and `test` extras (gcsfs, gcp-storage-emulator); skipped without them.
"""
import json
import socket

import pytest
from conftest import small_config

from moejax.eval import evaluate
from moejax.train import train_and_evaluate

TRAIN = ["model.vocab_size=384", "train.batch_size=8", "train.seq_len=32", "train.log_every=1",
         "train.save_every=2", "train.eval_batches=1", "optimizer.warmup_steps=1"]


def _with_generation(download):
    """GCS sends `x-goog-generation` with an object's bytes and TensorStore reads it
    (Orbax's OCDBT manifest); gcp-storage-emulator 2026.7 leaves it out, so add it."""
    def with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"],
                                       request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
        except Exception:  # noqa: BLE001 - a missing object stays a 404
            pass
    return with_generation


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    """An in-memory GCS emulator with bucket `moejax`; the test runs in an empty folder."""
    pytest.importorskip("gcsfs")
    server_module = pytest.importorskip("gcp_storage_emulator.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs (epath's gs:// backend)
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # Orbax's array writes
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "offline")  # TensorStore: no auth
    monkeypatch.setenv("EPATH_USE_TF", "false")
    objects = pytest.importorskip("gcp_storage_emulator.handlers.objects")
    monkeypatch.setattr(objects, "download", _with_generation(objects.download))
    server = server_module.create_server("127.0.0.1", port, in_memory=True,
                                         default_bucket="moejax")
    server.start()
    monkeypatch.chdir(tmp_path)
    from etils.epath import backend
    backend.fsspec_backend._get_filesystem.cache_clear()  # pick up the emulator
    try:
        yield "gs://moejax"
    finally:
        server.stop()
        backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.mark.slow  # 40 s with a warm compile cache, 3.5 min cold on a busy 2-core machine
def test_train_resume_eval_on_gcs(gcs, tmp_path):
    from etils import epath
    corpus = epath.Path(f"{gcs}/corpus")
    for i in range(40):  # the documents are read from the bucket too
        (corpus / f"doc{i:02d}.txt").write_text(f"document {i}: " + "lorem ipsum " * 40)
    data = ["data.source=text", f"data.path={corpus}/*.txt", "data.validation_fraction=0.25"]
    workdir = f"{gcs}/runs/tiny"
    first = train_and_evaluate(small_config(*TRAIN, *data, "train.steps=2"), workdir)
    resumed = train_and_evaluate(small_config(*TRAIN, *data, "train.steps=3"), workdir)
    assert (first["step"], resumed["step"]) == (2, 3)
    result = evaluate(small_config(*TRAIN, *data), workdir, max_new_tokens=4)
    assert result["step"] == 3
    run = epath.Path(workdir)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # resumed, appended
    assert json.loads((run / "eval.json").read_text())["loss"] == result["loss"]
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"  # plots through epath too
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "3"]
    events = list((run / "tensorboard").iterdir())
    assert len(events) == 2 and all(e.stat().length > 0 for e in events)  # one per run
    assert list(tmp_path.iterdir()) == []  # nothing went to a local gs:/ folder
