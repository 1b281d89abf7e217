"""``jax_sae.SAE`` on a real 20-step BatchTopK run (a variant whose inference reads saved state):
load, encode/decode on raw activations, checkpoint steps, SAELens export, and the hub round trip
against an in-memory hub served at ``requests``' transport layer (nothing above it is mocked)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import jax.numpy as jnp
import numpy as np
import pytest
import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict
from safetensors.numpy import load_file

import jax_sae
import train
from jax_sae import SAE
from jax_sae.report import runs
from jax_sae.sae import SAEError
from tests.test_train_cli import args, write_cache

STEPS, CHECKPOINT_EVERY = 20, 10  # args() checkpoints every 10 steps: steps 10 and 20 are kept
SETS = ("d_sae=64", "k=4", "lr=0.01", "warmup_steps=2")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished batchtopk run on 16-wide activations, trained on norm_scale * x."""
    root = tmp_path_factory.mktemp("sae_object")
    cache = write_cache(root / "cache")
    out = root / "run"
    argv = args(cache, out, "--steps", str(STEPS), variant="batchtopk", sets=SETS)
    assert train.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def sweep(run) -> Path:
    """A sweep of two seeds beside the run, on the same cache: one vmapped step, two members."""
    out = run.parent / "sweep"
    argv = args(run.parent / "cache", out, "--steps", "10", variant="batchtopk", sets=SETS)
    assert train.main([*argv, "--sweep", "seed=0,1"]) == 0
    return out


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    """Raw activations like the cache's (an offset of 1 and sparse directions): [2, 3, 16]."""
    rng = np.random.default_rng(1)
    return (rng.normal(size=(2, 3, 16)) + 1.0).astype(np.float32)


def batchtopk_codes(arrays: dict, threshold: float, x: np.ndarray) -> np.ndarray:
    """BatchTopK inference in float64 from the stored weights: relu(pre) where pre > threshold."""
    a = {k: v.astype(np.float64) for k, v in arrays.items()}
    pre = (x - a["b_dec"]) @ a["W_enc"] + a["b_enc"]
    return np.where(pre > threshold, np.maximum(pre, 0.0), 0.0)


# ------------------------------------------------------------------------------------------------
# load, encode, decode
# ------------------------------------------------------------------------------------------------


def test_encode_is_the_variants_encode_of_the_scaled_input_with_the_saved_threshold(run, x):
    sae = SAE.load(run)
    config = json.loads((run / runs.CONFIG).read_text())
    assert sae.norm_scale == config["norm_scale"] != 1.0 and jax_sae.SAE is SAE
    assert (sae.d_in, sae.d_sae, sae.d_code) == (16, 64, 64) and sae.step is None
    expected = sae.variant.encode(
        sae.params, jnp.asarray(x.reshape(-1, 16)) * sae.norm_scale, sae.state
    )
    codes = sae.encode(x)
    assert codes.shape == (2, 3, 64)
    np.testing.assert_allclose(np.asarray(codes).reshape(-1, 64), expected, rtol=1e-6, atol=1e-6)
    # the threshold is the one training learned (stored beside the weights), not batch top-k
    arrays = load_file(run / runs.PARAMS)
    threshold = float(arrays.pop("threshold")[0])
    assert threshold > 0 and float(sae.state["threshold"]) == pytest.approx(threshold)
    known = batchtopk_codes(arrays, threshold, x.reshape(-1, 16) * config["norm_scale"])
    np.testing.assert_allclose(np.asarray(codes).reshape(-1, 64), known, rtol=1e-5, atol=1e-5)


def test_reconstruction_is_in_the_units_of_x_as_the_saelens_export_computes_it(run, x, tmp_path):
    """The export folds the scale into its weights (export.saelens); a JumpReLU on those, in
    float64 on raw x, is an independent reconstruction in x's units."""
    sae = SAE.load(run)
    export = sae.to_saelens(tmp_path / "saelens")
    assert json.loads((export / "cfg.json").read_text())["architecture"] == "jumprelu"
    a = {k: v.astype(np.float64) for k, v in load_file(export / "sae_weights.safetensors").items()}
    raw = x.reshape(-1, 16).astype(np.float64)
    pre = (raw - a["b_dec"]) @ a["W_enc"] + a["b_enc"]
    expected = (pre * (pre > a["threshold"])) @ a["W_dec"] + a["b_dec"]
    x_hat = sae(x)
    assert x_hat.shape == x.shape
    np.testing.assert_allclose(np.asarray(x_hat).reshape(-1, 16), expected, rtol=1e-4, atol=1e-4)
    decoded = sae.variant.decode(sae.params, sae.encode(x).reshape(-1, 64)) / sae.norm_scale
    np.testing.assert_allclose(np.asarray(sae.decode(sae.encode(x))).reshape(-1, 16), decoded)


def test_a_checkpoint_step_loads_the_weights_and_state_saved_at_that_step(run, x, tmp_path):
    last = SAE.load(run / "checkpoints" / str(STEPS))
    final = SAE.load(run)
    for name, value in final.params.items():
        np.testing.assert_array_equal(np.asarray(last.params[name]), np.asarray(value))
    assert float(last.state["threshold"]) == pytest.approx(float(final.state["threshold"]))
    middle = SAE.load(run, step=CHECKPOINT_EVERY)
    assert middle.step == CHECKPOINT_EVERY and "step 10" in repr(middle)
    assert not np.allclose(np.asarray(middle.params["W_enc"]), np.asarray(final.params["W_enc"]))
    # a step's SAE writes a folder that loads back to the same weights
    saved = SAE.load(middle.save(run.parent / "step10"))
    assert json.loads((run.parent / "step10" / runs.CONFIG).read_text())["checkpoint_step"] == 10
    np.testing.assert_allclose(np.asarray(saved.encode(x)), np.asarray(middle.encode(x)), atol=1e-6)
    # and exports that step's weights (the scale folded in: b_dec / norm_scale)
    exported = load_file(middle.to_saelens(tmp_path / "export10") / "sae_weights.safetensors")
    expected_b_dec = np.asarray(middle.params["b_dec"]) / middle.norm_scale
    np.testing.assert_allclose(exported["b_dec"], expected_b_dec, rtol=1e-6)


def test_a_sweep_member_loads_as_a_run_and_the_sweep_names_one(sweep, x):
    member = SAE.load(sweep / "seed=1")
    assert member.config["sweep"]["member"] == "seed=1" and member.config["seed"] == 1
    scaled = jnp.asarray(x.reshape(-1, 16)) * member.norm_scale
    expected = member.variant.encode(member.params, scaled, member.state)
    np.testing.assert_allclose(np.asarray(member.encode(x)).reshape(-1, 64), expected, atol=1e-6)
    assert not np.array_equal(member.params["W_dec"], SAE.load(sweep / "seed=0").params["W_dec"])
    last_step = SAE.load(sweep / "seed=1" / "checkpoints" / "10")  # a member's own checkpoint
    np.testing.assert_array_equal(last_step.params["W_dec"], member.params["W_dec"])
    with pytest.raises(
        SAEError, match=r"it is a sweep of 2 runs; pass one member's folder, e\.g\."
    ):
        SAE.load(sweep)


def test_a_run_not_marked_finished_loads_with_a_warning(run, tmp_path):
    copy = SAE.load(run).save(tmp_path / "copy")
    runs.write_status(copy, runs.DIVERGED, reason="test")
    with pytest.warns(UserWarning, match="is marked diverged in status.json"):
        assert SAE.load(copy).status == runs.DIVERGED


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("missing", "is not a folder; pass a run folder written by train.py"),
        ("empty", "is not a run folder (no config.json; pass a folder written by train.py"),
        ("export", "it is a SAELens export; pass the run folder it was exported from"),
        ("unfinished", "has no sae_params.safetensors: training has not finished; load one of"),
        ("step", "has no checkpoint of step 15 (saved steps: 10, 20); choose one of those"),
    ],
)
def test_a_folder_that_is_not_a_run_is_one_clear_error(run, tmp_path, where, message):
    path = tmp_path / where
    if where == "empty":
        path.mkdir()
    elif where == "export":
        path.mkdir()
        (path / "cfg.json").write_text("{}")
    elif where == "unfinished":
        path.mkdir()
        (path / runs.CONFIG).write_bytes((run / runs.CONFIG).read_bytes())
    elif where == "step":
        path = run / "checkpoints" / "15"
    with pytest.raises(SAEError) as error:
        SAE.load(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_inputs_of_the_wrong_width_are_refused_in_one_line(run):
    sae = SAE.load(run)
    with pytest.raises(SAEError, match=r"x has shape \(4, 15\); expected \[\.\.\., 16\]"):
        sae.encode(np.zeros((4, 15), np.float32))
    with pytest.raises(SAEError, match=r"expected \[\.\.\., 64\] \(codes of this SAE\)"):
        sae.decode(np.zeros((4, 16), np.float32))


# ------------------------------------------------------------------------------------------------
# the hub: from_pretrained and push_to_hub
# ------------------------------------------------------------------------------------------------


class FakeHub(BaseAdapter):
    """The few Hugging Face hub endpoints that ``create_repo``, ``upload_folder`` and
    ``snapshot_download`` call, served in memory as a ``requests`` transport adapter: every
    request the client builds is answered here, and none reaches the network."""

    def __init__(self) -> None:
        super().__init__()
        self.repos: dict[str, dict[str, bytes]] = {}
        self.heads: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()  # snapshot_download fetches files on several threads

    def send(self, request: requests.PreparedRequest, **_: object) -> requests.Response:
        method, path = request.method or "", unquote(urlsplit(request.url or "").path)
        with self.lock:
            self.calls.append((method, path))
            status, headers, body = self.route(method, path, request.body)
        response = requests.Response()
        response.status_code, response.url, response.request = status, request.url, request
        response.headers = CaseInsensitiveDict({"Content-Length": str(len(body)), **headers})
        response.raw = io.BytesIO(body)
        response.reason = "OK" if status < 400 else "Error"
        return response

    def close(self) -> None:
        pass

    def route(self, method: str, path: str, body: object) -> tuple[int, dict, bytes]:
        def answer(data: object, status: int = 200) -> tuple[int, dict, bytes]:
            return status, {"Content-Type": "application/json"}, json.dumps(data).encode()

        if method == "POST" and path == "/api/repos/create":
            request = json.loads(body or b"{}")
            repo = "/".join(filter(None, (request.get("organization"), request["name"])))
            if repo in self.repos:
                return answer({"error": "already exists", "url": f"/{repo}"}, 409)
            self.repos[repo], self.heads[repo] = {}, "0" * 40
            return answer({"url": f"https://huggingface.co/{repo}"})
        repo, action, rest = self.split(path)
        if repo not in self.repos:
            return 404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "Repository not found"}'
        files = self.repos[repo]
        if method == "POST" and action == "preupload":
            listed = json.loads(body or b"{}")["files"]
            return answer(
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in listed
                    ]
                }
            )
        if method == "POST" and action == "commit":
            for line in (body or b"").splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            self.heads[repo] = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
            url = f"https://huggingface.co/{repo}/commit/{self.heads[repo]}"
            return answer({"commitUrl": url, "commitOid": self.heads[repo], "pullRequestUrl": None})
        if method == "GET" and action == "revision":
            siblings = [{"rfilename": name} for name in sorted(files)]
            return answer({"id": repo, "sha": self.heads[repo], "siblings": siblings})
        if method in ("HEAD", "GET") and action == "resolve":
            name = rest.split("/", 1)[1]
            if name not in files:
                return 404, {"X-Error-Code": "EntryNotFound"}, b""
            etag = hashlib.sha1(files[name]).hexdigest()
            headers = {
                "X-Repo-Commit": self.heads[repo],
                "ETag": f'"{etag}"',
                "Content-Length": str(len(files[name])),
            }
            return 200, headers, files[name] if method == "GET" else b""
        return answer({"error": f"FakeHub does not serve {method} {path}"}, 501)

    @staticmethod
    def split(path: str) -> tuple[str, str, str]:
        """(repo id, action, the rest) of ``/api/models/<repo>/<action>/<rest>`` or
        ``/<repo>/resolve/<revision>/<file>``."""
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            return "/".join(parts[2:4]), (parts[4:5] or [""])[0], "/".join(parts[5:])
        return "/".join(parts[:2]), (parts[2:3] or [""])[0], "/".join(parts[3:])


@pytest.fixture
def hub(monkeypatch) -> FakeHub:
    """huggingface_hub's sessions, each with the fake hub mounted for every URL."""
    import huggingface_hub
    from huggingface_hub import constants

    fake = FakeHub()

    def session() -> requests.Session:
        s = requests.Session()
        s.mount("https://", fake)
        s.mount("http://", fake)
        return s

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    huggingface_hub.configure_http_backend(backend_factory=session)
    yield fake
    huggingface_hub.configure_http_backend()  # the default sessions again


def test_from_pretrained_of_a_local_folder_works_offline(run, x, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    sae = SAE.from_pretrained(str(run))
    np.testing.assert_array_equal(np.asarray(sae.encode(x)), np.asarray(SAE.load(run).encode(x)))


def test_push_to_hub_then_from_pretrained_round_trips(run, x, hub, tmp_path):
    url = SAE.load(run).push_to_hub("me/tiny-sae", token="hf_test", path_in_repo="layer1")
    assert url == f"https://huggingface.co/me/tiny-sae/commit/{hub.heads['me/tiny-sae']}"
    uploaded = hub.repos["me/tiny-sae"]
    assert sorted(uploaded) == sorted(f"layer1/{name}" for name in SAE_FILES)
    assert uploaded["layer1/sae_params.safetensors"] == (run / runs.PARAMS).read_bytes()
    pulled = SAE.from_pretrained(
        "me/tiny-sae", subfolder="layer1", token="hf_test", cache_dir=tmp_path / "hub_cache"
    )
    np.testing.assert_array_equal(np.asarray(pulled.encode(x)), np.asarray(SAE.load(run).encode(x)))
    np.testing.assert_array_equal(np.asarray(pulled(x)), np.asarray(SAE.load(run)(x)))
    assert pulled.hub_repo == "me/tiny-sae"
    with pytest.raises(SAEError, match="has no run folder to export into .*; pass out_dir"):
        pulled.to_saelens()
    assert (pulled.to_saelens(tmp_path / "export") / "cfg.json").is_file()
    assert ("HEAD", "/me/tiny-sae/resolve/" + hub.heads["me/tiny-sae"] + "/layer1/config.json") in (
        hub.calls
    )


SAE_FILES = (runs.CONFIG, runs.PARAMS, runs.STATUS)


def test_hub_errors_are_one_line_naming_the_fix(run, hub, tmp_path):
    with pytest.raises(SAEError) as error:
        SAE.from_pretrained("me/no-such-repo", cache_dir=tmp_path / "hub_cache")
    text = str(error.value)
    assert "me/no-such-repo is neither a local folder nor a hub repository" in text
    assert "(no such repository, or a private one this token cannot read)" in text
    assert "check the path or repository id" in text and "\n" not in text
    SAE.load(run).push_to_hub("me/tiny-sae", token="hf_test", path_in_repo="layer1")
    with pytest.raises(SAEError, match="holds no config.json: it is not an SAE pushed"):
        SAE.from_pretrained("me/tiny-sae", cache_dir=tmp_path / "hub_cache")
    with pytest.raises(SAEError, match="cannot push to hub repository not/a/repo/id .* may write"):
        SAE.load(run).push_to_hub("not/a/repo/id", token="hf_test")


def test_offline_a_repository_not_in_the_cache_is_one_line(tmp_path, monkeypatch):
    """The hub client's own offline mode (its sessions refuse every request) with nothing
    cached: one line saying so."""
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    reset_sessions()  # the default sessions, now built offline
    try:
        with pytest.raises(SAEError, match=r"\(the hub is unreachable \(or HF_HUB_OFFLINE is set"):
            SAE.from_pretrained("me/tiny-sae", cache_dir=tmp_path / "hub_cache")
    finally:
        reset_sessions()
