"""The playground (proxy/playground/) in a real browser, Debian's chromium headless driven by
Selenium, through the whole stack on the tiny checkpoint: an image chosen through the file
input, the prompt's token count shown before sending (the model's, as POST /tokenize answers
it), the answer streamed in (the text the same request gets non-streamed), usage and the stage
timings after, a second turn on the same conversation; a video; and a proxy with an API key,
whose page asks for the key and sends it."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest
import requests
import stack as stack_launcher  # scripts/stack.py
from helpers import data_url, wait_until
from sample_images import encoded_image
from sample_videos import clip
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

# Debian's packages (scripts/setup installs them): Selenium is given both paths, so it never
# looks for or downloads a browser or a driver of its own.
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 60  # for the page's requests to the stack; a passing run takes a fraction of it
# Selenium looks again every 0.5 s by default: a dozen waits a test would each sleep most of that.
POLL_S = 0.05
MAX_TOKENS = 8
DONE = ".turn.assistant[data-state='done']"


@pytest.fixture(scope="module")
def browser() -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: tests run as root here, where chromium's sandbox refuses to start.
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(browser: WebDriver):
    return WebDriverWait(browser, WAIT_S, poll_frequency=POLL_S)


def open_playground(browser: WebDriver, url: str) -> None:
    browser.get(f"{url}/playground")
    wait(browser).until(lambda b: b.find_element(By.ID, "connection").text.startswith("connected"))


def settings(browser: WebDriver, **values: str) -> None:
    for field, value in values.items():
        entry = browser.find_element(By.ID, field)
        entry.clear()
        entry.send_keys(value)


def choose_file(browser: WebDriver, path) -> None:
    before = len(browser.find_elements(By.CSS_SELECTOR, "#attachments li"))
    browser.find_element(By.ID, "media").send_keys(str(path))
    wait(browser).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, "#attachments li")) == before + 1
    )


def counted(browser: WebDriver) -> tuple[int, str]:
    """The draft's token count once the page has shown it, and its text."""
    shown = browser.find_element(By.ID, "token-count")
    count = wait(browser).until(lambda b: shown.get_attribute("data-count"))
    return int(count), shown.text


def send(browser: WebDriver) -> WebElement:
    """Sends the draft; the answer's turn once it is done."""
    done = len(browser.find_elements(By.CSS_SELECTOR, DONE))
    browser.find_element(By.ID, "send").click()
    wait(browser).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, DONE)) == done + 1)
    error = browser.find_element(By.ID, "error")
    assert not error.is_displayed(), error.text
    return browser.find_elements(By.CSS_SELECTOR, DONE)[-1]


def answer_text(browser: WebDriver, turn: WebElement) -> str:
    # textContent, not Selenium's .text, which normalises whitespace
    return browser.execute_script("return arguments[0].querySelector('.text').textContent", turn)


def tokenize(base_url: str, messages: list) -> dict:
    response = requests.post(f"{base_url}/tokenize", json={"messages": messages}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def chat(base_url: str, messages: list) -> dict:
    body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    response = requests.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def timings_shown(turn: WebElement) -> dict[str, str]:
    rows = turn.find_elements(By.CSS_SELECTOR, "table.timings tr")
    return {row.find_elements(By.TAG_NAME, "td")[0].text: row.text for row in rows}


def test_a_two_turn_conversation_with_an_image(browser, base_url, tmp_path):
    png = encoded_image("PNG", size=(96, 64))
    image = tmp_path / "red.png"
    image.write_bytes(png)
    first = "What is in this picture?"
    open_playground(browser, base_url)
    settings(browser, **{"max-tokens": str(MAX_TOKENS), "temperature": "0"})
    choose_file(browser, image)
    browser.find_element(By.ID, "message").send_keys(first)

    # What the page sends: the file as a data URL, the detail it shows (auto), the text.
    image_part = {"type": "image_url", "image_url": {"url": data_url(png), "detail": "auto"}}
    turn_1 = [{"role": "user", "content": [image_part, {"type": "text", "text": first}]}]
    count, shown = counted(browser)  # before sending
    tokenized = tokenize(base_url, turn_1)
    assert count == tokenized["count"]
    image_tokens = next(part["tokens"] for part in tokenized["parts"] if part["type"] == "image")
    assert f"Prompt: {count} tokens" in shown and f"image {image_tokens} at " in shown

    answer = send(browser)
    text = answer_text(browser, answer)
    reference = chat(base_url, turn_1)  # the same request, not streamed
    assert text == reference["choices"][0]["message"]["content"]
    assert int(answer.get_attribute("data-chunks")) >= 1  # rendered delta by delta
    completion = int(answer.get_attribute("data-completion-tokens"))
    assert int(answer.get_attribute("data-prompt-tokens")) == count
    assert 0 < completion <= MAX_TOKENS
    usage = answer.find_element(By.CSS_SELECTOR, ".usage").text
    assert f"prompt {count} ({image_tokens} image)" in usage
    assert f"completion {completion}" in usage and f"total {count + completion} tokens" in usage
    timings = timings_shown(answer)
    for stage in ("queue", "media decode", "vision", "prefill", "ttft", "decode"):
        assert stage in timings and timings[stage].endswith(" ms"), timings

    # The second turn is counted and sent with the first (its image included) before it.
    second = "And what colour is it?"
    browser.find_element(By.ID, "message").send_keys(second)
    turn_2 = [
        *turn_1,
        {"role": "assistant", "content": text},
        {"role": "user", "content": second},
    ]
    count_2, _ = counted(browser)
    assert count_2 == tokenize(base_url, turn_2)["count"] > count + completion
    answer_2 = send(browser)
    assert int(answer_2.get_attribute("data-prompt-tokens")) == count_2
    assert (
        answer_text(browser, answer_2) == chat(base_url, turn_2)["choices"][0]["message"]["content"]
    )
    assert len(browser.find_elements(By.CSS_SELECTOR, "#transcript .turn")) == 4


def test_a_video(browser, base_url, tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(clip("mp4", "mpeg4", seconds=1.0, size=(64, 48)))
    open_playground(browser, base_url)  # a fresh page: a new conversation
    settings(browser, **{"max-tokens": "4", "temperature": "0"})
    choose_file(browser, video)
    browser.find_element(By.ID, "message").send_keys("What happens?")
    count, shown = counted(browser)
    assert " frames" in shown and "video " in shown
    answer = send(browser)
    assert int(answer.get_attribute("data-prompt-tokens")) == count
    assert " video)" in answer.find_element(By.CSS_SELECTOR, ".usage").text


@pytest.fixture(scope="module")
def keyed_proxy(stack, tmp_path_factory):
    """A second proxy in front of the same Triton, with an API key (on loopback: the
    playground is served by default)."""
    key = "playground-e2e-key-0123456789"
    config = dataclasses.replace(
        stack.config,
        proxy_port=stack_launcher.free_port(),
        proxy_args=["--api-key", key, "--no-state"],
    )
    log = tmp_path_factory.mktemp("keyed-proxy") / "proxy.log"
    with open(log, "wb") as output:
        proxy = subprocess.Popen(
            stack_launcher.proxy_command(config),
            cwd=stack_launcher.ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: stack_launcher._get_status(f"{config.proxy_url}/ready") == 200,
            what="the proxy with an API key",
        )
        yield config.proxy_url, key
    finally:
        proxy.terminate()
        proxy.wait(30)


def test_the_page_asks_for_the_key_and_sends_it(browser, keyed_proxy):
    url, key = keyed_proxy
    browser.get(f"{url}/playground")  # the page itself needs no key
    key_panel = browser.find_element(By.ID, "key-panel")
    wait(browser).until(lambda b: key_panel.is_displayed())  # GET /v1/models answered 401
    assert browser.find_element(By.ID, "connection").text == "needs an API key"

    browser.find_element(By.ID, "api-key").send_keys("not-the-key")
    browser.find_element(By.CSS_SELECTOR, "#key-form button[type='submit']").click()
    refused = browser.find_element(By.ID, "key-why")
    wait(browser).until(lambda b: refused.text == "The server refused this API key.")

    browser.find_element(By.ID, "api-key").send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "#key-form button[type='submit']").click()
    wait(browser).until(lambda b: not key_panel.is_displayed())
    settings(browser, **{"max-tokens": "4"})
    browser.find_element(By.ID, "message").send_keys("Hello")
    count, _ = counted(browser)  # POST /tokenize with the key
    answer = send(browser)  # and the chat completion
    assert int(answer.get_attribute("data-prompt-tokens")) == count
    # Kept for this tab only, in sessionStorage.
    stored = browser.execute_script(
        "return [sessionStorage.getItem('qwen-vl-playground.api-key'), localStorage.length,"
        " document.cookie]"
    )
    assert stored == [key, 0, ""]
