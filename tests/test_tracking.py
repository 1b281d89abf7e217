"""ExperimentLog: metrics.jsonl, TensorBoard event files read back, W&B offline runs, resume."""

import struct
import sys
from pathlib import Path

import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from jax_sae.training.tracking import WANDB_ID, ExperimentLog


def record(step: int, loss: float) -> dict:
    return {
        "step": step,
        "tokens": 64 * step,
        "loss": loss,
        "recon": loss / 2,
        "l1": 0.25,
        "grad_share/l1": 0.5,
    }


RECORDS = [record(10, 4.0), record(20, 2.0), record(30, 1.0)]


def tfrecords(file: Path) -> list[bytes]:
    """The payloads of a TFRecord file (8-byte length, its masked CRC, data, the data's CRC)."""
    data, pos, payloads = file.read_bytes(), 0, []
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        body = data[pos + 12 : pos + 12 + length]
        header_crc, body_crc = (
            struct.unpack("<I", data[i : i + 4])[0] for i in (pos + 8, pos + 12 + length)
        )
        assert (header_crc, body_crc) == (masked_crc32c(header), masked_crc32c(body))
        payloads.append(body)
        pos += 16 + length
    return payloads


def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """Scalars by tag and step as TensorBoard shows them: files in name order, and a session
    start at step s hides the earlier points at steps >= s."""
    tags: dict[str, dict[int, float]] = {}
    for file in sorted(logdir.glob("events.out.tfevents.*")):
        for payload in tfrecords(file):
            event = event_pb2.Event.FromString(payload)
            if event.session_log.status == event_pb2.SessionLog.START:
                tags = {t: {s: v for s, v in p.items() if s < event.step} for t, p in tags.items()}
            for value in event.summary.value:
                tags.setdefault(value.tag, {})[event.step] = value.simple_value
    return tags


def test_every_record_reaches_metrics_jsonl_and_tensorboard(tmp_path):
    with ExperimentLog(tmp_path, {}, name="run", tensorboard=True) as log:
        for r in RECORDS:
            log.append(r)
    assert log.read() == RECORDS
    shown = tensorboard_scalars(tmp_path / "tensorboard")
    assert set(shown) == {"tokens", "loss", "recon", "l1", "grad_share/l1"}
    assert shown["loss"] == {10: 4.0, 20: 2.0, 30: 1.0}
    assert shown["tokens"] == {10: 640.0, 20: 1280.0, 30: 1920.0}


def test_resume_truncates_metrics_and_hides_stale_tensorboard_points(tmp_path):
    with ExperimentLog(tmp_path, {}, name="run", tensorboard=True) as log:
        for r in RECORDS:
            log.append(r)
    with ExperimentLog(tmp_path, {}, name="run", tensorboard=True) as log:
        log.truncate_after(10)
        for r in (record(20, 3.0), record(30, 1.5)):
            log.append(r)
    assert [r["loss"] for r in log.read()] == [4.0, 3.0, 1.5]
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2
    assert tensorboard_scalars(tmp_path / "tensorboard")["loss"] == {10: 4.0, 20: 3.0, 30: 1.5}


class FakeRun:
    """Stands in for a W&B run: records log calls; the next step is the one W&B reports."""

    def __init__(self, step: int) -> None:
        self.step, self.logged, self.finished = step, [], False

    def log(self, data: dict, step: int) -> None:
        self.logged.append((step, data))

    def finish(self) -> None:
        self.finished = True


def test_wandb_gets_each_record_once_and_never_a_past_step(tmp_path, monkeypatch):
    runs, inits = [FakeRun(step=0), FakeRun(step=21)], []

    def init(**kwargs):
        inits.append(kwargs)
        return runs[len(inits) - 1]

    monkeypatch.setitem(sys.modules, "wandb", type(sys)("wandb"))
    monkeypatch.setattr(sys.modules["wandb"], "init", init, raising=False)
    with ExperimentLog(tmp_path, {"lr": 1e-3}, name="run", wandb_project="proj") as log:
        for r in RECORDS:
            log.append(r)
    assert [step for step, _ in runs[0].logged] == [10, 20, 30]
    assert runs[0].logged[0][1] == {k: v for k, v in RECORDS[0].items() if k != "step"}
    assert runs[0].finished
    with ExperimentLog(tmp_path, {"lr": 1e-3}, name="run", wandb_project="proj") as log:
        log.truncate_after(10)
        for r in (record(20, 3.0), record(30, 1.5), record(40, 1.0)):
            log.append(r)
    assert [step for step, _ in runs[1].logged] == [30, 40]
    run_id = (tmp_path / WANDB_ID).read_text().strip()
    expected = {"project": "proj", "name": "run", "config": {"lr": 1e-3}, "dir": str(tmp_path)}
    assert inits == 2 * [expected | {"id": run_id, "resume": "allow"}]


def test_wandb_offline_run_lands_in_the_run_folder_and_keeps_its_id(tmp_path, monkeypatch):
    for var, sub in (
        ("WANDB_DIR", "dir"),
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_CACHE_DIR", "c"),
    ):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    for _ in range(2):
        with ExperimentLog(out, {"lr": 1e-3}, name="run", wandb_project="proj") as log:
            log.append(RECORDS[0])
    run_id = (out / WANDB_ID).read_text().strip()
    offline = sorted((out / "wandb").glob("offline-run-*"))
    assert len(offline) == 2
    # offline-run-<time>-<id>, plus "-1" when the second session starts within the same second
    assert all(f"-{run_id}" in p.name for p in offline)
    assert all((p / f"run-{run_id}.wandb").stat().st_size > 0 for p in offline)


@pytest.mark.parametrize("tracker", ["tensorboardX", "wandb"])
def test_missing_package_names_the_install_command(tmp_path, monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # makes `import` fail
    options = {"tensorboard": True} if tracker == "tensorboardX" else {"wandb_project": "p"}
    with pytest.raises(
        ValueError, match=rf'{tracker} is not installed.*pip install -e "\.\[tracking\]"'
    ):
        ExperimentLog(tmp_path, {}, name="run", **options)
