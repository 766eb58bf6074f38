"""The board in a real headless browser (Debian's chromium through Playwright): the form, an error beside
its field, the plan changing with a key, a tiny-model run with its progress and loss chart, Stop, compare,
and 403 without the token. Screenshots go to the test's folder, and to $TUNELINE_SCREENSHOTS when set
(docs/board/ in the README is made that way)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, tiny_config

CHROMIUM = "/usr/lib/chromium/chromium"
playwright = pytest.importorskip("playwright.sync_api")
if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (make test installs it: apt-get install chromium)",
                allow_module_level=True)


@pytest.fixture
def board(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "tuneline"), "board", "--port", str(port), "--project",
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = re.search(r"(http://\S+)", proc.stdout.readline()).group(1)
    time.sleep(1)
    yield url, port, tmp_path
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=20)


def fill(page, values: dict) -> None:
    for key, value in values.items():
        text = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        box = page.locator(f"#{key}")
        tag = box.evaluate("e => e.tagName")
        if tag == "FIELDSET":  # a switch: click the label of the value (its radio input is hidden)
            box.locator(f"label:has(input[value='{text}'])").click()
            continue
        if tag == "SELECT":
            box.select_option(text)
        else:
            box.fill(text)
        box.dispatch_event("change")


def shot(page, folder: Path, name: str, at: str | None = None) -> None:
    if at:
        page.locator(at).scroll_into_view_if_needed()
    page.screenshot(path=str(folder / f"{name}.png"), full_page=False)
    if os.environ.get("TUNELINE_SCREENSHOTS"):
        Path(os.environ["TUNELINE_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / f"{name}.png", Path(os.environ["TUNELINE_SCREENSHOTS"]) / f"{name}.png")


def state_of(page, name: str, states: set[str], timeout_s: float = 300) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        cell = page.locator(f"#run-{name} .state")
        if cell.count() and cell.inner_text() in states:
            return cell.inner_text()
        time.sleep(0.5)
    raise AssertionError(f"run {name} never reached {states}")


def planned(page) -> set[str]:
    try:
        page.wait_for_selector(".plan")
    except Exception:
        raise AssertionError("no plan: " + page.locator("#plan").inner_html()[:3000]) from None
    return set(page.locator(".plan tr.job td:first-child").all_inner_texts())


def test_the_board_in_a_browser(board, tiny_model, tmp_path):
    url, port, project = board
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        anonymous = browser.new_context().new_page()
        assert anonymous.goto(f"http://127.0.0.1:{port}/").status == 403

        page = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
        start = time.perf_counter()
        page.goto(url)
        page.wait_for_selector("#field-lora_rank")
        first_paint = time.perf_counter() - start
        assert page.url.endswith("/") and "token" not in page.url  # the token moved into the cookie
        shot(page, shots, "train")

        # a bad value: the error beside its field, and no plan
        fill(page, {"lora_rank": "many"})
        page.wait_for_selector("#error-lora_rank:has-text('is not of type')")
        assert page.locator(".plan").count() == 0

        # a tiny-model config: the plan, then Start, progress and the loss chart
        tiny = tiny_config(tiny_model, REPO / "resources", max_steps=6)
        fill(page, {**tiny, "lora_rank": 8})
        page.fill("input[name=name]", "run1")
        page.locator("select[name=target]").select_option("results/merged_model")
        page.click("#config button[type=submit]")
        assert planned(page) == {"base_model", "prepare_data", "tokenize", "train", "merge"}
        assert page.locator("#error-lora_rank").inner_text() == ""
        shot(page, shots, "plan", at="#plan")
        page.click("#config button:has-text('Start')")
        assert state_of(page, "run1", {"finished", "failed"}) == "finished"
        page.wait_for_function("() => [...document.querySelectorAll('img')].some("
                               "i => i.src.includes('/runs/run1/loss.svg') && i.naturalWidth > 0)")
        assert re.search(r"5/5 jobs, step 6 loss \d", page.locator("#run-run1").inner_text())

        # editing a key changes the plan: cutoff_len reruns tokenize and train, nothing else
        page.evaluate("document.querySelector('#plan').innerHTML = ''")
        fill(page, {"cutoff_len": 64})
        assert planned(page) == {"tokenize", "train", "merge"}
        # a switch (a boolean key): gradient_checkpointing on reruns train and merge only; unset is offered
        # only where null is allowed
        page.evaluate("document.querySelector('#plan').innerHTML = ''")
        fill(page, {"cutoff_len": 128, "gradient_checkpointing": True})
        assert planned(page) == {"train", "merge"}
        assert page.locator("#gradient_checkpointing input").count() == 2
        assert page.locator("#ddp_find_unused_parameters input:checked").get_attribute("value") == ""
        fill(page, {"gradient_checkpointing": False})

        # a long run, stopped mid-training: no complete-looking adapter, no lock
        fill(page, {"cutoff_len": 128, "max_steps": 100000})
        page.fill("input[name=name]", "long")
        page.click("#config button:has-text('Start')")
        assert state_of(page, "long", {"running"}) == "running"
        deadline = time.time() + 120
        while not list((project / "runs" / "long" / ".tuneline" / "checkpoints").glob("train-*/loss.jsonl")):
            assert time.time() < deadline, "training did not start"
            time.sleep(0.3)
        page.wait_for_selector("#run-long button:has-text('Stop')")
        page.wait_for_function("() => [...document.querySelectorAll('img')].some("
                               "i => i.src.includes('/runs/long/loss.svg') && i.naturalWidth > 0)")
        shot(page, shots, "runs", at="#runlist")
        page.click("#run-long button:has-text('Stop')")
        assert state_of(page, "long", {"stopped"}, 60) == "stopped"
        assert not (project / "runs" / "long" / "results" / "adapter").exists()
        assert not list((project / "runs" / "long" / ".snakemake" / "locks").glob("*"))

        # Export then Evaluate run1 from their tabs: more targets of the same run, nothing upstream reruns
        page.reload()
        page.locator("#export select[name=run]").select_option("run1")
        page.locator("#export input[value='results/export/gguf']").uncheck()
        page.locator("#export input[value='results/export/bnb-8bit']").check()
        page.click("#export button.export")
        page.wait_for_selector("#exported .ok")
        # pushed by the board (server-sent events) as Snakemake reports the job finished
        page.wait_for_selector("#run-run1 .job.done:has-text('export_bnb')", timeout=300000)
        assert state_of(page, "run1", {"finished", "failed"}) == "finished"
        shot(page, shots, "export", at="#export")
        page.locator("#evaluate select[name=run]").select_option("run1")
        page.click("#evaluate button.evaluate")
        page.wait_for_selector("#evaluated .ok")
        page.wait_for_selector("#run-run1 .job.done:has-text('eval_summary')", timeout=300000)
        assert state_of(page, "run1", {"finished", "failed"}) == "finished"
        page.click("#evaluated a")  # the run's page: base vs tuned, sample predictions, export figures
        page.wait_for_selector("pre.summary")
        assert "bnb-8bit" in page.content()
        shot(page, shots, "evaluate")

        # chat with run1's merged model: the reply streams in (the model lives in a worker process)
        page.goto(f"http://127.0.0.1:{port}/")
        page.locator("#chatform select[name=run]").select_option("run1")
        page.fill("#chatform input[name=max_new_tokens]", "12")
        page.fill("#chatform textarea[name=text]", "Who are you?")
        page.click("#chatform button[type=submit]")
        page.wait_for_selector("#conversation .reply.done", timeout=120000)
        assert page.locator("#conversation .reply").inner_text().strip()
        shot(page, shots, "chat", at="#chat")

        # compare the two runs
        page.goto(f"http://127.0.0.1:{port}/compare?a=run1&b=long")
        assert "max_steps" in page.locator("table.diff").inner_text()
        shot(page, shots, "compare")
        browser.close()
    print(f"first paint {first_paint:.2f} s")
    assert {p.name for p in shots.iterdir()} == {"train.png", "plan.png", "runs.png", "chat.png", "compare.png",
                                                     "export.png", "evaluate.png"}
