"""RunRecord against config.json files frozen from the trainer as it was before RunRecord
(tests/data/run_config_v1*.json: a run, the same run extended by --resume --steps, a sweep
member; tests/data/run_v1/ holds the rest of that run's folder, cache_manifest_v1.json the
manifest of its cache). Such run folders must still load, resume, compare and export: the record
round-trips to the same dict and the same hash."""

import json
import shutil
from pathlib import Path

import pytest

import train
from jax_sae.data.cache import MANIFEST
from jax_sae.export.saelens import export_run
from jax_sae.report import compare, runs
from jax_sae.report.record import RunRecord
from jax_sae.training.config import ConfigError
from jax_sae.training.resolve import continued_config
from tests.test_train_cli import args, write_cache

DATA = Path(__file__).parent / "data"
FROZEN = ["run_config_v1.json", "run_config_v1_extended.json", "run_config_v1_sweep_member.json"]
V1_STEPS = 20  # the frozen run: tests/test_train_cli.args(cache, out, "--steps", "20")


def frozen(name: str = "run_config_v1.json") -> dict:
    return json.loads((DATA / name).read_text())


@pytest.mark.parametrize("name", FROZEN)
def test_a_v1_config_round_trips_to_the_same_dict_and_hash(name):
    data = frozen(name)
    record = RunRecord.from_json(data)
    assert record.to_json() == data and list(record.to_json()) == list(data)
    assert json.dumps(record.to_json(), indent=1) == (DATA / name).read_text()
    assert runs.config_hash(record.to_json()) == data["config_hash"]
    assert record.replace(config_hash=None).hashed().config_hash == data["config_hash"]
    assert record.accepted_hashes == {data["config_hash"]} | {
        e["config_hash"] for e in data.get("extends", [])
    }


def test_a_record_keeps_entries_it_does_not_know_and_reads_missing_ones_as_none():
    data = frozen() | {"written_by_a_later_version": [1, 2]}
    del data["mesh"], data["divergence"]  # entries of later versions than the file's
    record = RunRecord.from_json(data)
    assert record.extra == {"written_by_a_later_version": [1, 2]} and record.mesh is None
    assert record.to_json() == data and runs.config_hash(record.to_json()) == data["config_hash"]
    assert record.replace(mesh="data=2").to_json()["mesh"] == "data=2"


def test_extending_a_v1_run_records_what_the_old_trainer_recorded(tmp_path):
    old, extended = RunRecord.from_json(frozen()), frozen("run_config_v1_extended.json")
    new = old.replace(steps=30).hashed()
    assert new.config_hash == extended["config_hash"]
    assert continued_config(tmp_path, old, new).extends == extended["extends"]
    with pytest.raises(ConfigError, match="cannot resume .* differs in hparams.lambda"):
        changed = old.replace(hparams=old.hparams | {"lambda": 0.5}).hashed()
        continued_config(tmp_path, old, changed)


def v1_cache(path: Path) -> Path:
    """The frozen run's cache, written again: the same shards, and its manifest as it was written
    then (the identity config.json records is the hash of the manifest's bytes)."""
    write_cache(path)
    manifest = DATA / "cache_manifest_v1.json"
    assert json.loads((path / MANIFEST).read_text()) == json.loads(manifest.read_text())
    shutil.copy(manifest, path / MANIFEST)
    return path


@pytest.fixture(scope="module")
def v1_run(tmp_path_factory) -> Path:
    """The frozen run's folder (weights, metrics, final info, status and config.json)."""
    folder = tmp_path_factory.mktemp("v1") / "run_v1"
    shutil.copytree(DATA / "run_v1", folder)
    shutil.copy(DATA / "run_config_v1.json", folder / runs.CONFIG)
    return folder


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> Path:
    """A folder holding only the frozen config.json, resumed by today's trainer with the flags
    that wrote it, on its cache."""
    root = tmp_path_factory.mktemp("resume")
    cache = v1_cache(root / "c")
    out = root / "run"
    out.mkdir()
    shutil.copy(DATA / "run_config_v1.json", out / runs.CONFIG)
    assert train.main(args(cache, out, "--steps", str(V1_STEPS), "--resume")) == 0
    return out


def test_resume_accepts_a_v1_run_folder(resumed):
    written = runs.read_json(resumed / runs.CONFIG)
    assert written["config_hash"] == frozen()["config_hash"]
    assert runs.read_status(resumed)["state"] == runs.FINISHED


def test_resume_refuses_a_v1_run_folder_with_other_settings(tmp_path, capsys):
    cache = v1_cache(tmp_path / "c")
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(DATA / "run_config_v1.json", out / runs.CONFIG)
    other = args(cache, out, "--steps", str(V1_STEPS), "--resume", "--set", "lambda=0.5")
    assert train.main(other) == 2
    err = capsys.readouterr().err
    assert "differs in hparams.lambda" in err and "rerun with --set lambda=0.003 " in err
    assert (out / runs.CONFIG).read_text() == (DATA / "run_config_v1.json").read_text()


def test_compare_accepts_a_v1_run_folder_beside_a_new_one(v1_run, resumed, tmp_path):
    rows = compare.compare([v1_run, resumed], tmp_path / "compare")
    assert [row["run"] for row in rows] == ["run_v1", "run"]
    assert (tmp_path / "compare" / "comparison.md").is_file()


def test_export_accepts_a_v1_run_folder(v1_run, tmp_path):
    out = export_run(v1_run, tmp_path / "export")
    exported = json.loads((out / "cfg.json").read_text())
    assert exported["d_sae"] == 64 and exported["d_in"] == 16


def test_hyper_parameters_added_since_v1_leave_the_hash_at_their_old_value():
    """A run recorded before `encoder_init_scale` existed was trained with the old init: the
    entry at that value hashes as the file without it, and any other value is a new experiment."""
    old = frozen()
    at_old_value = {**old, "hparams": {**old["hparams"], "encoder_init_scale": None}}
    other_value = {**old, "hparams": {**old["hparams"], "encoder_init_scale": 0.1}}
    assert runs.config_hash(at_old_value) == old["config_hash"]
    assert runs.config_hash(other_value) != old["config_hash"]
    assert runs.differing_keys(old, at_old_value) == []
    assert runs.differing_keys(old, other_value) == ["hparams.encoder_init_scale"]
