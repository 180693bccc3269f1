"""Edges a new user meets, each one line before any work, nothing lost: an unreachable Ray address, a manifest
that names files outside its folder, a disk too small for the output."""

from __future__ import annotations

import socket
import time

import pytest

from recoup.cli import main


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_unreachable_ray_address_fails_in_seconds_naming_it(tmp_path, capsys):
    pytest.importorskip("ray")
    address = f"127.0.0.1:{_closed_port()}"
    t0 = time.time()
    assert main(["run", "--out", str(tmp_path / "run"), "--executor", "ray", "--address", address]) == 2
    err = capsys.readouterr().err
    assert time.time() - t0 < 60  # ray.init alone would retry such an address for minutes
    assert len(err.strip().splitlines()) == 1 and address in err and "nothing answers" in err
    assert not (tmp_path / "run" / "stages").exists()


@pytest.mark.parametrize("address", ["nonsense", "host:port", ":80"])
def test_malformed_ray_address_is_one_line(address):
    from recoup.errors import RecoupError
    from recoup.runs.ray_executor import check_reachable

    with pytest.raises(RecoupError, match="HOST:PORT"):
        check_reachable(address)


def _packed_artifact(tmp_path):
    from helpers import tiny_loaded

    from recoup.artifact.report import CompressReport, LinearRecord
    from recoup.artifact.store import save_artifact

    lm = tiny_loaded("llama")
    name = "model.layers.0.self_attn.q_proj"
    w = dict(lm.model.named_modules())[name].weight
    w.data[:, ::2] = 0
    records = [LinearRecord(name, 0, tuple(w.shape), 0.5, None, None, 0.0, "weight", 0.0)]
    report = CompressReport(
        "magnitude", {"method": "magnitude", "sparsity": 0.5, "bits": None}, "llama", None, records, 0.0, 0.0
    )
    return save_artifact(lm, report, tmp_path / "art")


@pytest.mark.parametrize("where", ["files-parent", "files-absolute", "packed-file"])
def test_manifest_naming_a_file_outside_the_artifact_is_refused_before_reading_it(tmp_path, monkeypatch, capsys, where):
    import json

    from recoup.artifact import store
    from recoup.artifact.store import seal_manifest
    from recoup.model.load import file_sha256

    art = _packed_artifact(tmp_path)
    outside = tmp_path / "secret.txt"
    outside.write_text("not the artifact's")
    man = json.loads((art / "recoup.json").read_text())
    name = "../secret.txt" if where == "files-parent" else str(outside)
    if where == "packed-file":
        assert man["storage"]["kind"] == "packed"
        man["storage"]["file"] = str(outside)
    else:
        man["files"][name] = file_sha256(outside)
    (art / "recoup.json").write_text(json.dumps(seal_manifest(man)))  # anyone can recompute the digest
    read = []
    real_sha = store.file_sha256
    monkeypatch.setattr(store, "file_sha256", lambda p, *a: read.append(str(p)) or real_sha(p, *a))
    capsys.readouterr()
    assert main(["eval", str(art), "--tasks", "ppl:ptb"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a plain file name" in err
    assert not any("secret" in p for p in read)


def test_idp_record_naming_a_file_outside_its_folder_is_refused(tmp_path):
    import json

    from recoup.errors import RecoupError
    from recoup.model.recovery import RECOVERY_RECORD
    from recoup.recover.idp import IDPPool

    folder = tmp_path / "pool"
    folder.mkdir()
    (tmp_path / "w.safetensors").write_bytes(b"")
    (folder / RECOVERY_RECORD).write_text(json.dumps({"method": "idp", "weights": "../w.safetensors"}))
    with pytest.raises(RecoupError, match="not a plain file name"):
        IDPPool.load(folder)


def test_output_that_cannot_fit_is_refused_before_compressing(tmp_path, monkeypatch, capsys):
    import shutil as _shutil

    from helpers import save_tiny

    import recoup.compress as compress_room
    from recoup.artifact import space

    save_tiny(tmp_path / "tiny")
    ran = []
    monkeypatch.setattr(compress_room, "compress", lambda *a, **k: ran.append(1))
    usage = _shutil.disk_usage(tmp_path)
    monkeypatch.setattr(space.shutil, "disk_usage", lambda p: usage._replace(free=4096))
    capsys.readouterr()
    assert (
        main(
            [
                "compress",
                str(tmp_path / "tiny"),
                "--method",
                "magnitude",
                "--sparsity",
                "0.5",
                "--out",
                str(tmp_path / "art"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # progress bars aside
    assert len(errors) == 1 and "cannot fit the artifact" in errors[0] and "MB are free" in err
    assert ran == [] and not (tmp_path / "art").exists()


@pytest.mark.parametrize("path", ["--lazy", "--no-lazy"])
def test_full_disk_while_writing_is_one_line_and_leaves_nothing_half_written(tmp_path, monkeypatch, capsys, path):
    import errno
    from pathlib import Path

    from helpers import save_tiny
    from transformers import PreTrainedModel

    from recoup.artifact import layerwise

    save_tiny(tmp_path / "tiny")

    def disk_fills_up(self, folder, **kwargs):  # what safetensors raises when the disk fills mid-write
        (tmp_path / "marker").write_text("write started")
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 64)
        raise Exception(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    def merge_fills_up(out, *args, **kwargs):  # the layer-by-layer writer's merge: a plain OSError
        (tmp_path / "marker").write_text("write started")
        Path(out).write_bytes(b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_fills_up)
    monkeypatch.setattr(layerwise, "merge_safetensors", merge_fills_up)
    capsys.readouterr()
    assert (
        main(
            [
                "compress",
                str(tmp_path / "tiny"),
                "--method",
                "magnitude",
                "--sparsity",
                "0.5",
                path,
                "--out",
                str(tmp_path / "art"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (tmp_path / "marker").exists(), "the write was reached"
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # progress bars aside
    assert len(errors) == 1 and "no space left on the device" in errors[0] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker", "tiny"]  # no artifact, no partial folder
