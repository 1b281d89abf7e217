"""The feature browser: its statistics against brute force on hand-built codes, the page of a
run of the tiny model and of a synthetic world, refusals, and the page in a real browser."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import train
from jax_sae import SAE
from jax_sae import features as fb
from tests.test_train_cli import args, one_error_line, write_cache

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


class ReluOfInput:
    """An "SAE" whose codes are relu(x): the statistics can be checked against the input."""

    def encode(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(np.asarray(x, np.float32), 0)


def test_one_pass_statistics_equal_brute_force_over_chunks():
    rng = np.random.default_rng(0)
    n, width, top = 1000, 7, 5
    codes = (rng.exponential(size=(n, width)) * (rng.random((n, width)) < 0.3)).astype(np.float32)
    codes[:, 6] = 0  # a dead latent
    codes[[3, 900], 5] = [0.001, 50.0]  # outside the first chunk's range: the end bins
    stats = fb.collect(ReluOfInput(), codes, n, top=top, chunk=128, progress=False)
    fired = codes > 0
    np.testing.assert_array_equal(stats.fire_counts, fired.sum(0))
    np.testing.assert_allclose(stats.act_sums, codes.sum(0), rtol=1e-5)
    for latent in range(width):
        order = np.argsort(-codes[:, latent], kind="stable")[:top]
        np.testing.assert_allclose(stats.top_values[latent], codes[order, latent])
        live = stats.top_values[latent] > 0
        np.testing.assert_array_equal(  # rows of the largest values (ties: any of them)
            codes[stats.top_rows[latent][live], latent], codes[order, latent][live]
        )
        clipped = np.clip(
            codes[fired[:, latent], latent],
            stats.bin_edges[0] * 1.0001,
            stats.bin_edges[-1] * 0.9999,
        )
        expected, _ = np.histogram(clipped, bins=stats.bin_edges)
        np.testing.assert_array_equal(stats.histogram[latent], expected)
    assert stats.histogram[6].sum() == 0 and not stats.top_values[6].any()
    assert stats.histogram[5][[0, -1]].sum() >= 2


def test_context_windows_stop_at_sequence_boundaries():
    starts = np.zeros(40, bool)
    starts[[0, 10, 30]] = True
    assert fb.context_window(5, starts) == (0, 10)  # CONTEXT_AFTER 4: rows 6..9
    assert fb.context_window(12, starts) == (10, 17)
    assert fb.context_window(29, starts) == (29 - fb.CONTEXT_BEFORE, 30)
    assert fb.context_window(30, starts) == (30, 35)
    assert fb.context_window(39, starts) == (30, 40)


def test_true_feature_matching_and_output_tokens_against_brute_force():
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(12, 8))
    permutation = rng.permutation(12)[:6]
    directions = 3.0 * truth[permutation]
    match, cos = fb.match_true_features(directions, truth)
    np.testing.assert_array_equal(match, permutation)
    np.testing.assert_allclose(cos, 1.0, rtol=1e-6)
    unembedding = rng.normal(size=(50, 8))
    ids, values = fb.output_token_ids(directions, unembedding, n=4, block=4)
    logits = directions @ unembedding.T
    np.testing.assert_array_equal(ids, np.argsort(-logits, axis=1)[:, :4])
    np.testing.assert_allclose(values, np.sort(logits, axis=1)[:, ::-1][:, :4], rtol=1e-4)


# --- pages of real runs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tiny_cache, tmp_path_factory) -> Path:
    """A topk SAE trained briefly on layer 2 of the tiny model."""
    out = tmp_path_factory.mktemp("features") / "run"
    argv = [
        "--cache",
        str(tiny_cache),
        "--layer",
        "2",
        "--variant",
        "topk",
        "--steps",
        "30",
        "--set",
        "d_sae=128",
        "--set",
        "k=8",
        "--batch-size",
        "128",
        "--eval-tokens",
        "500",
        "--normalize",
        "--out",
        str(out),
    ]
    assert train.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def tiny_page(tiny_run) -> Path:
    return fb.make_page(tiny_run, progress=False)


def test_the_page_of_a_tiny_model_run_holds_what_the_sae_computes(tiny_run, tiny_page, tiny_cache):
    record = json.loads((tiny_page.parent / fb.SUMMARY).read_text())
    meta, rows = record["meta"], record["latents"]
    sae = SAE.load(tiny_run)
    from jax_sae.data.cache import ActivationCache

    cache = ActivationCache(tiny_cache)
    codes = np.asarray(sae.encode(cache.acts(2)[:]))
    assert meta["tokens"] == cache.n_tokens and meta["output_tokens"] and not meta["synthetic"]
    rates = np.array([row[1] for row in rows])
    np.testing.assert_allclose(rates, (codes > 0).mean(0), rtol=1e-3, atol=1e-6)
    assert meta["dead"] == int(((codes > 0).sum(0) == 0).sum())
    busiest = int(np.argmax(rates))
    assert rows[busiest][3] == pytest.approx(codes[:, busiest].max(), rel=1e-3)
    chunk = (tiny_page.parent / "data" / "latents_000.js").read_text()
    assert chunk.startswith("receiveLatents(")
    detail = json.loads(chunk[len("receiveLatents(") : -3])["latents"][busiest]
    assert len(detail["contexts"]) == fb.TOP_CONTEXTS and len(detail["outputs"]) == 8
    tokens, hi, act = detail["contexts"][0]
    assert act == pytest.approx(codes[:, busiest].max(), rel=1e-3) and 0 <= hi < len(tokens)
    assert all(isinstance(t, str) for t in tokens)  # decoded by the model's tokenizer
    assert not any(t.startswith("#") for t in tokens)


def test_a_synthetic_world_page_names_each_latents_true_feature(tmp_path):
    cache = write_cache(tmp_path / "cache")
    run = tmp_path / "run"
    assert (
        train.main(args(cache, run, "--steps", "10", variant="topk", sets=("d_sae=32", "k=4"))) == 0
    )
    directions = fb.decoder_directions(SAE.load(run))
    order = np.random.default_rng(2).permutation(32)
    truth = np.zeros((40, directions.shape[1]), np.float32)
    truth[order] = directions  # the true feature of latent i is order[i]
    save_file({"feature_vectors": truth}, cache / fb.GROUND_TRUTH)
    page = fb.make_page(run, out=tmp_path / "page", progress=False)
    record = json.loads((page.parent / fb.SUMMARY).read_text())
    assert record["meta"]["synthetic"]
    columns = record["columns"]
    matched = [row[columns.index("true_feature")] for row in record["latents"]]
    cosines = [row[columns.index("true_cosine")] for row in record["latents"]]
    assert matched == order.tolist() and min(cosines) > 0.9999


def test_folders_it_did_not_write_are_refused_and_its_own_are_rewritten(
    tiny_run, tiny_page, tmp_path, capsys
):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "paper.tex").write_text("mine")
    assert fb.main([str(tiny_run), "--out", str(foreign)]) == 2
    assert "did not write" in one_error_line(capsys)
    assert [p.name for p in foreign.iterdir()] == ["paper.tex"]
    (tiny_page.parent / "data" / "latents_999.js").write_text("stale")
    assert fb.main([str(tiny_run), "--tokens", "300"]) == 0
    assert not (tiny_page.parent / "data" / "latents_999.js").exists()
    assert json.loads((tiny_page.parent / fb.SUMMARY).read_text())["meta"]["tokens"] == 300


def test_a_cache_of_another_width_and_a_non_run_are_one_line(tiny_run, tmp_path, capsys):
    other = write_cache(tmp_path / "other")
    assert fb.main([str(tiny_run), "--cache", str(other), "--out", str(tmp_path / "a")]) == 2
    assert "width" in one_error_line(capsys)
    assert fb.main([str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "not a run folder" in one_error_line(capsys)


# --- in a real browser -----------------------------------------------------------------------


def chromium_driver():
    """Debian's chromium, headless, with its console log readable; CI installs it (.ci/run)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI; .ci/run installs chromium chromium-driver")
        pytest.skip("no chromium here: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1300,900",
        "--allow-file-access-from-files",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@pytest.mark.slow
def test_the_page_loads_searches_and_opens_a_latent_in_chromium(tiny_page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    record = json.loads((tiny_page.parent / fb.SUMMARY).read_text())
    latent = max(record["latents"], key=lambda row: row[1])[0]
    copy = tmp_path / "page"  # a page moved elsewhere still works: it names no absolute path
    shutil.copytree(tiny_page.parent, copy)
    driver = chromium_driver()
    try:
        driver.get((copy / "index.html").resolve().as_uri())
        wait = WebDriverWait(driver, 20)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#list li"))
        assert "128 latents" in driver.find_element(By.ID, "count").text
        driver.find_element(By.ID, "search").send_keys(str(latent))
        links = driver.find_elements(By.CSS_SELECTOR, "#list a")
        assert links and all(a.get_attribute("data-latent").startswith(str(latent)) for a in links)
        next(a for a in links if a.get_attribute("data-latent") == str(latent)).click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#latent .ctx"))
        assert driver.find_element(By.CSS_SELECTOR, "#latent h2").text == f"Latent {latent}"
        assert len(driver.find_elements(By.CSS_SELECTOR, "#latent .ctx")) == fb.TOP_CONTEXTS
        assert len(driver.find_elements(By.CSS_SELECTOR, "#latent .tok.hi")) == fb.TOP_CONTEXTS
        assert driver.find_elements(By.CSS_SELECTOR, "#latent svg rect")  # the histogram
        assert driver.find_elements(By.CSS_SELECTOR, "#latent .outs span")
        shot = tmp_path / "latent.png"
        assert driver.save_screenshot(str(shot))
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    finally:
        driver.quit()
    assert not errors, errors
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert min(pixels.shape[:2]) > 600 and pixels[..., :3].std() > 0.05  # not blank
