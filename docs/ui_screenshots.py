"""Take the UI guide's screenshots (docs/images/ui-*.png) with the browser test's driver (headless Chromium through
Selenium; `apt-get install chromium chromium-driver`, `pip install selenium`). Not a page: run it by hand after
changing a page.

    python docs/ui_screenshots.py [--root /tmp/shots] [--pages train jobs dataset loras]

The root gets `data/` (a copy of datasets_examples/flat_poster) and `runs/flat_poster` (the README's job on the demo
model, 150 steps with a checkpoint every 50, trained once: about two minutes on a CPU)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from sdlora.ui.server import make_server  # noqa: E402

IMAGES = ROOT / "docs" / "images"
EXAMPLE = ROOT / "datasets_examples" / "flat_poster"
PROMPT = "flatposter, a red house with a blue roof"


def prepare(root: Path) -> None:
    if not (root / "data").is_dir():
        shutil.copytree(EXAMPLE, root / "data")
    run = root / "runs" / "flat_poster"
    if not (run / "flat_poster.safetensors").is_file():
        command = [sys.executable, "-m", "sdlora", "train", "--config", str(EXAMPLE / "train.toml"), "--output", str(run)]
        subprocess.run(command + ["--steps", "150", "--checkpoint-every", "50"], check=True)


def browser() -> webdriver.Chrome:
    options = Options()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1100", "--hide-scrollbars"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def tab(driver, name: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f'#tabs button[data-tab="{name}"]').click()


def train_page(driver, root: Path) -> None:
    """The form with a preset saved and the model's family shown beside it."""
    tab(driver, "train")
    driver.find_element(By.ID, "preset-path").send_keys("presets/flat_poster.toml")
    driver.find_element(By.ID, "preset-load").click()
    message = driver.find_element(By.ID, "preset-message")
    WebDriverWait(driver, 30).until(lambda _: message.text.startswith("loaded"))
    WebDriverWait(driver, 30).until(lambda _: "SD1.x model" in driver.find_element(By.CSS_SELECTOR, ".model-family").text)
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(IMAGES / "ui-train.png"))


def dataset_page(driver) -> None:
    tab(driver, "dataset")
    driver.find_element(By.CSS_SELECTOR, "#dataset-form button").click()
    WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".image-card")) > 8)
    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('.image-card img')].slice(0, 8).every((i) => i.complete && i.naturalWidth)"
        )
    )
    driver.save_screenshot(str(IMAGES / "ui-dataset.png"))


def loras_page(driver) -> None:
    """An X/Y comparison of the run's checkpoints at three weights."""
    tab(driver, "loras")
    form = driver.find_element(By.ID, "grid-form")
    model = form.find_element(By.NAME, "model")
    model.clear()
    model.send_keys("demo")
    form.find_element(By.NAME, "lora_steps").send_keys("runs/flat_poster")
    weights = form.find_element(By.NAME, "weights")
    weights.clear()
    weights.send_keys("0, 0.6, 1.2")
    form.find_element(By.NAME, "prompts").send_keys(PROMPT)
    for name, value in (("seeds", "1"), ("steps", "10")):
        field = form.find_element(By.NAME, name)
        field.clear()
        field.send_keys(value)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    message = driver.find_element(By.ID, "grid-message")
    WebDriverWait(driver, 600).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grid-images img") or "failed" in message.text)
    assert "failed" not in message.text, message.text
    WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.querySelector('#grid-images img').complete"))
    driver.execute_script("document.querySelector('#grid-form textarea[name=prompts]').scrollIntoView()")
    driver.save_screenshot(str(IMAGES / "ui-loras.png"))


def jobs_page(driver) -> None:
    """The README's job (its train.toml as a preset) started from the form, 120 steps with the held-out loss and
    samples every 20, followed to its end."""
    tab(driver, "train")
    driver.find_element(By.ID, "preset-path").clear()
    driver.find_element(By.ID, "preset-path").send_keys("presets/readme_job.toml")
    driver.find_element(By.ID, "preset-load").click()
    message = driver.find_element(By.ID, "preset-message")
    WebDriverWait(driver, 30).until(lambda _: message.text.startswith("loaded"))
    for name, value in (("output_dir", "runs/flat_poster_ui"), ("steps", "120"), ("validate_every", "20"), ("checkpoint_every", "40")):
        # set as typed, also where the field's section is folded
        driver.execute_script(
            "const f = document.getElementById(arguments[0]); f.value = arguments[1]; f.dispatchEvent(new Event('input', {bubbles: true}))",
            f"opt-{name}",
            value,
        )
    driver.find_element(By.ID, "train-start").click()
    status = driver.find_element(By.ID, "job-status")
    WebDriverWait(driver, 1200).until(lambda _: status.text in ("done", "failed"))
    assert status.text == "done", driver.find_element(By.ID, "job-error").text
    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script("return [...document.querySelectorAll('#job-samples img')].every((i) => i.complete && i.naturalWidth)")
    )
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(IMAGES / "ui-jobs.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/shots")
    parser.add_argument("--pages", nargs="+", default=["train", "jobs", "dataset", "loras"], choices=["train", "jobs", "dataset", "loras"])
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    prepare(root)
    server = make_server(port=0, roots=[str(root)], state_dir=str(root / ".sdlora-ui"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    driver = browser()
    try:
        driver.get(f"http://127.0.0.1:{server.port}/")
        WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.ready") == "true")
        # the preset the train page loads: the README's job as the form saves it
        (root / "presets").mkdir(exist_ok=True)
        preset = driver.execute_script(
            "return fetch('/api/csrf').then((r) => r.json()).then(({token}) => fetch('/api/presets', {method: 'POST', "
            "headers: {'X-CSRF-Token': token, 'Content-Type': 'application/json'}, body: JSON.stringify({path: "
            "'presets/flat_poster.toml', options: {data_dir: 'data', output_dir: 'runs/flat_poster_2', model: 'demo', "
            "name: 'flat_poster', trigger: 'flatposter', resolution: 64, rank: 4, alpha: 8.0, preset: 'all', steps: 300, lr: 0.001}})})).then((r) => r.status)"
        )
        assert preset == 200, preset
        job = (EXAMPLE / "train.toml").read_text(encoding="utf-8").replace('data_dir = "."', 'data_dir = "../data"')
        (root / "presets" / "readme_job.toml").write_text(job, encoding="utf-8")  # the README's job, read as the CLI would
        for page in args.pages:
            pages = {"train": lambda: train_page(driver, root), "jobs": lambda: jobs_page(driver), "dataset": lambda: dataset_page(driver)}
            (pages | {"loras": lambda: loras_page(driver)})[page]()
            print(f"wrote {IMAGES / f'ui-{page}.png'}")
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
