"""The explorer page (serving/page/) in a real browser, headless Chromium from the system's packages driven by
Selenium through the system's chromedriver, against a live server on the tiny model; and what the page stands on:
the API's `"return_scalings": "layers"`, a page that needs no key and opens nothing to other sites, and the
package data that ships it."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys
import time
import xml.etree.ElementTree as ET

import httpx
import pytest
import torch
from helpers import serving

from loramix.analysis import ScalingsLog
from loramix.serving.page import PAGE_FILES

KEY = "page-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "hello page"
MAX_TOKENS = 12
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def keyed(served_checkpoint):
    """The served checkpoint (it has a chat template) behind an API key: (state, LiveServer)."""
    with serving(served_checkpoint, api_key=KEY, max_tokens_cap=64) as live:
        yield live


def _browser_paths() -> tuple[str, str]:
    """(Chromium, chromedriver) from LORAMIX_CHROMIUM / LORAMIX_CHROMEDRIVER or the PATH; skips, saying which is
    missing, where either cannot be found or Selenium is not installed."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("the browser test needs Selenium (pip install selenium; it is in the `test` extra)")
    browser = os.environ.get("LORAMIX_CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)
    driver = os.environ.get("LORAMIX_CHROMEDRIVER") or shutil.which("chromedriver")
    missing = [what for what, path in (("Chromium (apt-get install chromium)", browser),
                                       ("chromedriver (apt-get install chromium-driver)", driver)) if not path]
    if missing:
        pytest.skip("the browser test cannot run: " + " and ".join(f"{m} not found" for m in missing) +
                    "; LORAMIX_CHROMIUM / LORAMIX_CHROMEDRIVER may name their paths")
    return browser, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium through the system's chromedriver (Selenium Manager never asked to download anything),
    downloading into its own folder: (driver, downloads folder)."""
    chromium, chromedriver = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: no downloads, ever
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1100", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield driver, downloads
    finally:
        driver.quit()


def _until(driver, script: str, timeout: float = 15.0):
    """Polls `script` (JavaScript returning a value) until it is truthy; its value."""
    deadline = time.time() + timeout
    while True:
        value = driver.execute_script(script)
        if value or time.time() > deadline:
            assert value, f"timed out waiting for: {script}"
            return value
        time.sleep(0.05)


def _download(driver, downloads, button: str, name: str, timeout: float = 10.0) -> bytes:
    """Clicks a download button; the bytes of the file it saves."""
    path = downloads / name
    path.unlink(missing_ok=True)
    driver.find_element("id", button).click()
    deadline = time.time() + timeout
    # Chromium may create the final name (empty) before it writes the bytes through a .crdownload file and
    # renames it; the download is done when no partial file remains and the size holds between two polls.
    last_size = -1
    while time.time() < deadline:
        partial = any(p.suffix == ".crdownload" for p in downloads.iterdir())
        size = path.stat().st_size if path.exists() else -1
        if not partial and size > 0 and size == last_size:
            return path.read_bytes()
        last_size = size
        time.sleep(0.1)
    raise AssertionError(f"{button} saved no complete {name} (folder holds {sorted(p.name for p in downloads.iterdir())})")


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=AUTH, timeout=30)


def _api_answer(server, chat: bool, text: str, **extra) -> dict:
    body = {"model": "tiny-xlora", "max_tokens": MAX_TOKENS, "temperature": 0,
            "xlora": {"return_scalings": "layers"}, **extra}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    response = _post(server, "/v1/chat/completions" if chat else "/v1/completions", body)
    assert response.status_code == 200, response.text
    return response.json()


def _open(driver, server) -> None:
    """Loads the page, which asks for the key (it keeps none across loads), and types the key in."""
    driver.get(server.url + "/")
    _until(driver, "return document.getElementById('model-line').textContent.includes('API key')")
    assert "tiny-xlora" not in driver.page_source and "expert_0" not in driver.page_source  # nothing without the key
    driver.find_element("id", "api-key").send_keys(KEY + "\t")  # the field's change event loads the model card
    _until(driver, "return document.getElementById('model-line').textContent.includes('tiny-xlora')")


def _page_tokens(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#answer .tok')].map(s => s.textContent)")


def _generate(driver, text: str) -> None:
    prompt = driver.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys(text)
    limit = driver.find_element("id", "max-tokens")
    limit.clear()
    limit.send_keys(str(MAX_TOKENS))
    driver.find_element("id", "run").click()
    state = _until(driver, "const s = document.getElementById('answer').dataset.state; "
                           "return s === 'done' || s === 'error' ? s : null")
    assert state == "done", driver.find_element("id", "status").text


def test_the_page_streams_the_greedy_answer_and_draws_its_scalings(keyed, browser, tmp_path):
    state, server = keyed
    driver, downloads = browser
    model = state.model
    answer = _api_answer(server, chat=False, text=PROMPT)
    text, scalings = answer["choices"][0]["text"], torch.tensor(answer["xlora"]["scalings"])  # (T, L, E)
    n_tokens = answer["usage"]["completion_tokens"]
    assert scalings.shape == (n_tokens, model.n_lora_layers, model.n_experts) and n_tokens >= 3

    _open(driver, server)
    legend = driver.execute_script("return [...document.querySelectorAll('#legend .expert')].map(e => e.textContent)")
    assert legend == list(model.expert_names)

    _generate(driver, PROMPT)
    tokens = _page_tokens(driver)
    assert "".join(tokens) == text and len(tokens) == n_tokens
    leading = driver.execute_script("return [...document.querySelectorAll('#answer .tok')].map(s => +s.dataset.expert)")
    assert leading == scalings.sum(1).argmax(-1).tolist()
    assert all(name in driver.find_element("css selector", "#answer .tok").get_attribute("title")
               for name in model.expert_names)  # the mix on hover, in the tooltip and beneath the answer
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).move_to_element(driver.find_elements("css selector", "#answer .tok")[1]).perform()
    _until(driver, "return document.getElementById('mix').textContent.startsWith('token 1 ')")
    assert all(name in driver.find_element("id", "mix").text for name in model.expert_names)

    # the history: one column per token, one row per expert
    cells = driver.execute_script("return [...document.querySelectorAll('#history rect.cell')]"
                                  ".map(r => [+r.dataset.token, +r.dataset.expert])")
    assert sorted(map(tuple, cells)) == [(t, e) for t in range(n_tokens) for e in range(model.n_experts)]
    assert len(driver.find_elements("css selector", "#history g.col")) == n_tokens

    # a clicked token: its LoRA layers x experts, the values the API gave
    chosen = 2
    driver.find_elements("css selector", "#answer .tok")[chosen].click()
    _until(driver, f"return document.getElementById('heatmap-caption').textContent.startsWith('token {chosen} ')")
    heat = driver.execute_script("return [...document.querySelectorAll('#heatmap rect.cell')].map(r => "
                                 "[+r.dataset.layer, +r.dataset.expert, r.querySelector('title').textContent])")
    assert len({layer for layer, _, _ in heat}) == model.n_lora_layers
    assert len(heat) == model.n_lora_layers * model.n_experts
    for layer, expert, title in heat:
        assert abs(float(title.rsplit(": ", 1)[1]) - scalings[chosen, layer, expert].item()) <= 5e-4

    # downloads: the scalings as `loramix analyze --scalings` reads them, the figures as SVG and PNG
    (tmp_path / "scalings.safetensors").write_bytes(_download(driver, downloads, "dl-safetensors",
                                                              "scalings.safetensors"))
    log = ScalingsLog.load(str(tmp_path / "scalings.safetensors"))
    assert torch.equal(log.scalings, scalings) and "".join(log.tokens) == text
    assert log.layer_names == list(model.lora_layer_names) and log.expert_names == list(model.expert_names)
    saved = json.loads(_download(driver, downloads, "dl-json", "scalings.json"))
    assert torch.equal(torch.tensor(saved["scalings"]), scalings) and saved["tokens"] == tokens
    svg = ET.fromstring(_download(driver, downloads, "dl-heatmap-svg", f"heatmap-token-{chosen}.svg"))
    assert len([r for r in svg.iter("{http://www.w3.org/2000/svg}rect") if "data-layer" in r.attrib]) == len(heat)
    assert _download(driver, downloads, "dl-history-png", "history.png").startswith(b"\x89PNG\r\n\x1a\n")

    # the key lives in the tab's memory only
    assert driver.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]") == [0, 0, ""]
    screenshot = tmp_path / "page.png"
    driver.save_screenshot(str(screenshot))
    print(f"page screenshot: {screenshot}", file=sys.stderr)


def test_the_page_chats_when_the_model_has_a_chat_template(keyed, browser):
    state, server = keyed
    driver, _ = browser
    answer = _api_answer(server, chat=True, text="hi there")
    expected = answer["choices"][0]["message"]["content"]
    _open(driver, server)
    driver.find_element("id", "mode-chat").click()
    _generate(driver, "hi there")
    assert "".join(_page_tokens(driver)) == expected
    assert len(_page_tokens(driver)) == answer["usage"]["completion_tokens"]
    transcript = driver.find_element("id", "transcript").text
    assert "user: hi there" in transcript and f"assistant: {expected}" in transcript


def test_the_gate_controls_reach_the_request(keyed, browser):
    state, server = keyed
    driver, downloads = browser
    gate = {"return_scalings": "layers", "top_k": 1, "freeze_scalings_after": 2}
    answer = _api_answer(server, chat=False, text=PROMPT, xlora=gate)
    _open(driver, server)
    for field, value in (("top-k", 1), ("freeze-after", 2)):
        driver.find_element("id", field).send_keys(str(value))
    _generate(driver, PROMPT)
    assert "".join(_page_tokens(driver)) == answer["choices"][0]["text"]
    saved = json.loads(_download(driver, downloads, "dl-json", "scalings.json"))
    assert saved["request"]["xlora"] == gate and saved["request"]["temperature"] == 0
    assert torch.equal(torch.tensor(saved["scalings"]), torch.tensor(answer["xlora"]["scalings"]))


def test_the_page_needs_no_key_reveals_nothing_and_opens_nothing_to_other_sites(keyed):
    state, server = keyed
    for route, (name, media_type) in PAGE_FILES.items():
        response = httpx.get(server.url + route, headers={"Origin": "https://elsewhere.example"})
        assert response.status_code == 200 and response.headers["content-type"] == media_type
        assert "connect-src 'self'" in response.headers["content-security-policy"]
        assert not any(h.startswith("access-control-") for h in response.headers)
        assert "tiny-xlora" not in response.text and "expert_0" not in response.text
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.post(server.url + "/", json={}).status_code == 405  # the page is GET only
    preflight = httpx.options(server.url + "/v1/completions", headers={
        "Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert not any(h.startswith("access-control-") for h in preflight.headers)
    card = httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"][0]
    assert card["xlora"]["lora_layers"] == list(state.model.lora_layer_names) and card["chat_template"] is True
    assert "/" not in httpx.get(server.url + "/openapi.json", headers=AUTH).json()["paths"]


def test_return_scalings_layers_gives_each_lora_layer(keyed):
    state, server = keyed
    model = state.model
    summed = _api_answer(server, chat=False, text=PROMPT, xlora={"return_scalings": True})
    layers = _api_answer(server, chat=False, text=PROMPT)
    assert layers["choices"][0]["text"] == summed["choices"][0]["text"]
    per_layer = torch.tensor(layers["xlora"]["scalings"])
    assert per_layer.shape == (layers["usage"]["completion_tokens"], model.n_lora_layers, model.n_experts)
    assert torch.allclose(per_layer.sum(1), torch.tensor(summed["xlora"]["scalings"]), atol=1e-5)
    assert torch.equal(torch.tensor(layers["choices"][0]["xlora"]["scalings"]), per_layer)
    # streamed: each chunk carries its token's layers
    body = {"model": "tiny-xlora", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "xlora": {"return_scalings": "layers"}}
    streamed = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                streamed += (json.loads(line[6:]).get("xlora") or {}).get("scalings", [])
    assert torch.equal(torch.tensor(streamed), per_layer)
    # chat too; anything but true, false or "layers" is a 400 naming the field
    chat = _api_answer(server, chat=True, text="hi")
    assert torch.tensor(chat["xlora"]["scalings"]).shape[1:] == (model.n_lora_layers, model.n_experts)
    for wrong in ("layer", "summed", 1, ["layers"]):
        response = _post(server, "/v1/completions", {"model": "tiny-xlora", "prompt": "a",
                                                     "xlora": {"return_scalings": wrong}})
        assert response.status_code == 400 and response.json()["error"]["param"] == "xlora.return_scalings"


def test_the_page_files_are_package_data():
    """Every file of the page folder is served and matched by pyproject.toml's package-data (so wheels ship it)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    import loramix.serving.page as page

    folder = os.path.dirname(page.__file__)
    files = {f for f in os.listdir(folder) if not f.endswith((".py", ".pyc")) and f != "__pycache__"}
    assert files == {name for name, _ in PAGE_FILES.values()}
    root = os.path.join(os.path.dirname(__file__), "..", "..", "pyproject.toml")
    with open(root, "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["loramix.serving.page"]
    assert all(any(fnmatch.fnmatch(name, p) for p in patterns) for name in files)
    assert all(page.page_file(name) for name in files)
