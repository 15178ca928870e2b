"""The live page in a real headless Chromium while a tiny run trains: it asks for the API key, plots new points
without a reload, shows the eval samples and gets a scored completion from a checkpoint.

Needs Debian's `chromium` and `chromium-driver` (apt-get install -y chromium chromium-driver): selenium drives them,
nothing is downloaded. RLHF_SKIP_BROWSER=1 skips it; RLHF_LIVE_PAGE_SCREENSHOT=<file.png> saves what the page
looked like mid-run."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from services.trainer.app import create_app as create_trainer_app
from tests.api.test_trainer_page import KEY, generator_app
from tests.e2e.test_train_tiny import reward_app, tiny_config

pytestmark = pytest.mark.slow

INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"


def open_chromium():
    """A headless Chromium driven through the system chromedriver; a missing one fails the test (CI installs it)."""
    if os.environ.get("RLHF_SKIP_BROWSER") == "1":
        pytest.skip("RLHF_SKIP_BROWSER=1")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.fail(f"the live page test needs Chromium and chromedriver on PATH: {INSTALL} (or set "
                    "RLHF_SKIP_BROWSER=1 to skip it)", pytrace=False)
    try:
        from selenium import webdriver
    except ImportError:
        pytest.fail("the live page test needs selenium: pip install -e '.[test]'", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1400"):
        options.add_argument(argument)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)


def texts(driver, selector: str) -> list[str]:
    """The text of every match, read in one go: the page re-renders tables as the run goes on."""
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent)",
                                 selector)


def plotted(driver) -> int:
    """Points of the rollout reward line as drawn (0 before the first)."""
    from selenium.webdriver.common.by import By

    lines = driver.find_elements(By.CSS_SELECTOR, "#reward-chart polyline.series-rollout")
    return len(lines[0].get_attribute("points").split()) if lines else 0


def start_running_trainer(tiny_kit, tmp_path, serve):
    """Reward, generator and a guarded trainer whose run (300 steps, an eval and a checkpoint every 2) outlasts the
    test; stopping the server at the end stops it after a save."""
    runs = tmp_path / "runs"
    reward = serve(reward_app(tiny_kit))
    generator = serve(generator_app(tiny_kit, runs))
    config = tiny_config(tiny_kit, runs, reward.url, f"generator.url={generator.url}", "train.total_steps=300",
                         "train.eval_interval=2", "train.checkpoint_interval=2")
    return serve(create_trainer_app(config, api_key=KEY, stop_grace_s=60), ready_path="/healthz")


def test_the_live_page_follows_a_running_job(tiny_kit, tmp_path, serve):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    driver = open_chromium()  # first: a missing browser fails at once
    try:
        trainer = start_running_trainer(tiny_kit, tmp_path, serve)
        wait = WebDriverWait(driver, 180, poll_frequency=0.2)
        driver.get(trainer.url + "/")
        key = wait.until(seen.visibility_of_element_located((By.ID, "key-input")))  # the API answered 401
        key.send_keys(KEY)
        driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
        driver.execute_script("window.sameDocument = true")  # gone if the page reloads
        wait.until(lambda d: d.find_element(By.ID, "state").text == "running")

        first = wait.until(lambda d: plotted(d))
        wait.until(lambda d: plotted(d) > first)  # the next polls appended points
        assert driver.execute_script("return window.sameDocument") is True
        assert re.fullmatch(r"\d+ / 300", driver.find_element(By.ID, "step").text)
        assert driver.find_elements(By.CSS_SELECTOR, "#reward-chart circle.series-eval")  # eval points

        scores = wait.until(lambda d: texts(d, "#samples td.score"))
        assert all(0 <= float(s) <= 1 for s in scores)
        assert all(texts(driver, "#samples td.text .prompt"))

        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys('<b id="injected">This movie</b> was')  # shown as text, never parsed as HTML
        tokens = driver.find_element(By.ID, "max-new-tokens")
        tokens.clear()
        tokens.send_keys("8")
        # The table is redrawn at each new checkpoint: a button found just before may be gone (stale); look again.
        patient = WebDriverWait(driver, 180, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException])
        checkpoint = 'button[data-checkpoint^="tiny/step-"]'
        patient.until(lambda d: d.find_element(By.CSS_SELECTOR, checkpoint).click() or True)
        score = wait.until(seen.visibility_of_element_located((By.ID, "completion-score")))
        assert 0 <= float(score.text) <= 1
        text = driver.find_element(By.ID, "completion-text").text
        assert text.startswith('<b id="injected">This movie</b> was') and not driver.find_elements(By.ID, "injected")
        assert driver.find_element(By.ID, "state").text == "running"  # all of it while the job trained
        if os.environ.get("RLHF_LIVE_PAGE_SCREENSHOT"):
            driver.save_screenshot(os.environ["RLHF_LIVE_PAGE_SCREENSHOT"])
    finally:
        driver.quit()
