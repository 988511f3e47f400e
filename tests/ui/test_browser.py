"""The page in a real browser (headless Chromium from the system's packages, through Selenium): the training form
is drawn from the options' sections, a bad value is shown at its field without starting a run, the fixed form
is shown as its config.toml, and a caption edited on the dataset page is written to its .txt file; a training
submitted from the form is followed to its end, another stopped and resumed, and the LoRAs page lists the result."""

from __future__ import annotations

import json
import shutil

import pytest

from sdlora.errors import UserError
from sdlora.training.checkpoint import latest_checkpoint
from sdlora.training.config import SECTIONS, TrainConfig, option_fields, section_title

webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (the test extra) for the browser test")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="apt-get install chromium chromium-driver for the browser test"),
]


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options  # selenium: only where the test runs
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_draws_the_training_form_and_shows_a_bad_value_at_its_field(ui, ui_root, browser):
    from selenium.webdriver.common.by import By  # selenium: only where the test runs
    from selenium.webdriver.support.ui import WebDriverWait

    server, client = ui
    browser.get(f"http://127.0.0.1:{server.port}/")
    WebDriverWait(browser, 30).until(lambda driver: driver.execute_script("return document.body.dataset.ready") == "true")
    titles = [element.get_attribute("textContent") for element in browser.find_elements(By.CSS_SELECTOR, "#train-sections summary")]
    assert titles == [section_title(name) for name in SECTIONS]
    drawn = [element.get_attribute("data-option") for element in browser.find_elements(By.CSS_SELECTOR, "#train-sections .field")]
    assert drawn == [item.name for _, item in option_fields() if item.name != "resume"]
    rank_help = browser.find_element(By.CSS_SELECTOR, '.field[data-option="rank"] small').text
    assert rank_help.startswith(SECTIONS["network"].__dataclass_fields__["rank"].metadata["help"]) and rank_help.endswith("(default: 16)")
    assert browser.find_element(By.ID, "opt-crop").get_attribute("value") == "center"

    browser.find_element(By.ID, "opt-data_dir").send_keys("data")
    browser.find_element(By.ID, "opt-output_dir").send_keys("out")
    browser.find_element(By.ID, "opt-rank").send_keys("0")
    browser.find_element(By.ID, "train-start").click()
    error = browser.find_element(By.ID, "err-rank")
    WebDriverWait(browser, 30).until(lambda _: error.text)
    with pytest.raises(UserError) as expected:
        TrainConfig.from_options(data_dir=str(ui_root / "data"), output_dir=str(ui_root / "out"), rank=0)
    assert error.text == str(expected.value)
    assert "invalid" in browser.find_element(By.CSS_SELECTOR, '.field[data-option="rank"]').get_attribute("class")
    assert client.get("/api/jobs")[1]["jobs"] == [] and not (ui_root / "out").exists()

    rank = browser.find_element(By.ID, "opt-rank")
    rank.clear()
    rank.send_keys("4")
    browser.find_element(By.ID, "train-toml").click()
    toml = browser.find_element(By.ID, "train-toml-text")
    WebDriverWait(browser, 30).until(lambda _: toml.is_displayed())
    assert '[network]\nkind = "lora"\nrank = 4\n' in toml.text and f'data_dir = "{ui_root / "data"}"' in toml.text
    assert error.text == "" and browser.find_element(By.ID, "train-message").text == "the options are valid"
    # a preset saved from the form and loaded back into it; the defaults shown follow the model's family
    browser.find_element(By.ID, "preset-path").send_keys("presets/p.toml")
    browser.find_element(By.ID, "preset-save").click()
    preset_message = browser.find_element(By.ID, "preset-message")
    WebDriverWait(browser, 30).until(lambda _: preset_message.text.startswith("saved"))
    assert (ui_root / "presets" / "p.toml").read_text().endswith(toml.text.split("\n", 1)[1] + "\n")
    rank.clear()
    rank.send_keys("9")
    browser.find_element(By.ID, "preset-load").click()
    WebDriverWait(browser, 30).until(lambda _: preset_message.text.startswith("loaded"))
    assert rank.get_attribute("value") == "4" and browser.find_element(By.ID, "opt-data_dir").get_attribute("value") == str(
        ui_root / "data"
    )
    buckets_default = browser.find_element(By.CSS_SELECTOR, "#opt-buckets option")
    assert buckets_default.text == "(default: false for this SD1.x model)"
    model = browser.find_element(By.ID, "opt-model")
    assert model.get_attribute("value") == "tiny"  # the preset's
    model.clear()
    model.send_keys("tiny-sdxl")
    WebDriverWait(browser, 30).until(lambda _: buckets_default.text == "(default: true for this SDXL model)")
    assert browser.find_element(By.ID, "opt-resolution").get_attribute("placeholder") == "64 for this SDXL model"
    # the dataset page: a caption edited in place is the .txt beside the image on disk
    browser.find_element(By.CSS_SELECTOR, '#tabs button[data-tab="dataset"]').click()
    browser.find_element(By.CSS_SELECTOR, "#dataset-form button").click()
    WebDriverWait(browser, 30).until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, ".image-card")) == 4)
    card = browser.find_element(By.CSS_SELECTOR, '.image-card[data-path="img01.png"]')
    caption = card.find_element(By.TAG_NAME, "textarea")
    assert caption.get_attribute("value") == (ui_root / "data" / "img01.txt").read_text()
    caption.clear()
    caption.send_keys("a blue circle, ink hatch")
    card.find_element(By.TAG_NAME, "button").click()
    WebDriverWait(browser, 30).until(lambda _: card.find_element(By.CLASS_NAME, "message").text == "saved to img01.txt")
    assert (ui_root / "data" / "img01.txt").read_text() == "a blue circle, ink hatch\n"

    # no script error (the refused POST's 400 is logged as a network error, which it is meant to be)
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE" and entry["source"] != "network"]
    assert severe == []


def _fill(browser, options: dict) -> None:
    """Set form fields as a user would leave them (text, select or checkbox), each announcing its change."""
    browser.execute_script(
        """
        for (const [name, value] of Object.entries(arguments[0])) {
          const input = document.getElementById(`opt-${name}`);
          if (input.type === "checkbox") input.checked = value === true; else input.value = String(value);
          input.dispatchEvent(new Event("input", {bubbles: true}));
          input.dispatchEvent(new Event("change", {bubbles: true}));
        }""",
        options,
    )


def test_a_training_started_in_the_page_runs_to_its_end_and_another_stops_and_resumes(ui, ui_root, browser):
    """The form for the tiny model, submitted: the Jobs page's bar reaches the end, its loss chart has one point per
    logged step, a sample image is shown; a second job is stopped and resumed from its checkpoint to its end; the
    LoRAs page lists the new file with its rank and alpha."""
    from selenium.webdriver.common.by import By  # selenium: only where the test runs
    from selenium.webdriver.support.ui import WebDriverWait

    server, client = ui
    browser.get(f"http://127.0.0.1:{server.port}/")
    WebDriverWait(browser, 30).until(lambda driver: driver.execute_script("return document.body.dataset.ready") == "true")
    tiny = {"model": "tiny", "resolution": 64, "rank": 4, "alpha": 8.0, "batch_size": 2, "report_to": "none", "seed": 3}
    _fill(
        browser,
        tiny | {"data_dir": "data", "output_dir": "runs/a", "steps": 3, "checkpoint_every": 0, "validate_every": 3, "sample_steps": 1},
    )
    browser.find_element(By.ID, "train-start").click()
    status = browser.find_element(By.ID, "job-status")
    WebDriverWait(browser, 240).until(lambda _: status.text in ("done", "failed"))
    assert status.text == "done", browser.find_element(By.ID, "job-error").text
    bar = browser.find_element(By.ID, "job-bar")
    assert bar.get_attribute("data-step") == "3" and browser.execute_script("return arguments[0].style.width", bar) == "100%"
    logged = [json.loads(line) for line in (ui_root / "runs" / "a" / "metrics.jsonl").read_text().splitlines()]
    chart = browser.find_element(By.ID, "loss-chart")
    assert int(chart.get_attribute("data-points")) == sum("loss" in line for line in logged) == 3
    WebDriverWait(browser, 30).until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#job-samples img"))
    sample = browser.find_element(By.CSS_SELECTOR, "#job-samples img")
    WebDriverWait(browser, 30).until(lambda _: browser.execute_script("return arguments[0].naturalWidth", sample) > 0)
    assert sample.get_attribute("alt").startswith("step-")

    # a second job, stopped once it has a checkpoint, then resumed to its end
    browser.find_element(By.CSS_SELECTOR, '#tabs button[data-tab="train"]').click()
    _fill(browser, {"output_dir": "runs/b", "steps": 40, "checkpoint_every": 2, "validate_every": 0, "samples": False})
    browser.find_element(By.ID, "train-start").click()
    checkpoints = ui_root / "runs" / "b" / "checkpoints"
    WebDriverWait(browser, 240).until(lambda _: latest_checkpoint(checkpoints) if checkpoints.is_dir() else None)
    WebDriverWait(browser, 30).until(lambda driver: driver.find_element(By.ID, "job-stop").is_enabled())
    browser.find_element(By.ID, "job-stop").click()
    WebDriverWait(browser, 120).until(lambda _: status.text in ("stopped", "done"))
    assert status.text == "stopped"
    stopped_at = int(bar.get_attribute("data-step"))
    assert 2 <= stopped_at < 40
    WebDriverWait(browser, 30).until(lambda driver: driver.find_element(By.ID, "job-resume").is_enabled())
    browser.find_element(By.ID, "job-resume").click()
    WebDriverWait(browser, 300).until(lambda _: status.text in ("done", "failed"))
    assert status.text == "done" and bar.get_attribute("data-step") == "40"
    lines = [json.loads(line) for line in (ui_root / "runs" / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == list(range(1, 41))  # resumed from the checkpoint: every step once

    # the LoRAs page lists what the first run wrote, with its rank and alpha
    browser.find_element(By.CSS_SELECTOR, '#tabs button[data-tab="loras"]').click()
    folder = browser.find_element(By.CSS_SELECTOR, '#loras-form input[name="dir"]')
    folder.clear()
    folder.send_keys("runs/a")
    browser.find_element(By.CSS_SELECTOR, "#loras-form button").click()
    WebDriverWait(browser, 30).until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#lora-table tbody tr"))
    rows = {
        cells[0]: cells
        for row in browser.find_elements(By.CSS_SELECTOR, "#lora-table tbody tr")
        for cells in [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")]]
    }
    assert rows["lora.safetensors"][5:7] == ["4", "8"]  # rank, alpha
