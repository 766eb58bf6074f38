"""`tuneline board` (issue #17, first part): the form from the schema, the plan, runs started and stopped, and
the security checks. Driven over HTTP with Starlette's test client (no browser yet)."""

from __future__ import annotations

import re
import time

import pytest
import yaml

pytest.importorskip("starlette")
pytest.importorskip("multipart")

from starlette.testclient import TestClient  # noqa: E402

from conftest import REPO, tiny_config  # noqa: E402
from tuneline.board import forms, runs  # noqa: E402
from tuneline.board.app import create_app, svg_curve  # noqa: E402

TOKEN = "t0ken"


@pytest.fixture
def project(tmp_path):
    return tmp_path


def client(project, token=TOKEN) -> TestClient:
    c = TestClient(create_app(project, TOKEN))
    if token:
        c.cookies.set("tuneline_board", token)
    return c


def tiny_form(tiny_model, **extra) -> dict:
    """The keys a tiny-model run changes, as the form submits them (strings)."""
    cfg = tiny_config(tiny_model, REPO / "resources", **extra)
    return {k: ("" if v is None else str(v).lower() if isinstance(v, bool) else str(v)) for k, v in cfg.items()}


def wait_for(c, name, states, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        row = re.search(rf'id="run-{name}">.*?class="state">(\w+)<', c.get("/runs").text, re.S)
        if row and row.group(1) in states:
            return row.group(1)
        time.sleep(0.5)
    raise AssertionError(f"run {name} not in {states} after {timeout} s")


def test_every_request_needs_the_token_the_host_and_the_origin_of_the_board(project):
    anonymous = client(project, token=None)
    assert anonymous.get("/").status_code == 403
    assert anonymous.post("/plan", data={"lora_rank": "4"}).status_code == 403
    assert anonymous.get("/static/htmx-2.0.11.min.js").status_code == 403
    assert client(project, token="guess").get("/runs").status_code == 403
    opened = anonymous.get(f"/?token={TOKEN}", follow_redirects=False)
    assert opened.status_code == 303 and opened.headers["location"].endswith("/")
    cookie = opened.headers["set-cookie"]
    assert f"tuneline_board={TOKEN}" in cookie and "SameSite=strict" in cookie and "HttpOnly" in cookie
    c = client(project)
    assert c.get("/").status_code == 200
    # a form on another local port posting here carries the cookie (same site) but not this Origin
    assert c.post("/save", data={"name": "x"}, headers={"origin": "http://localhost:9999"}).status_code == 403
    assert c.get("/", headers={"host": "evil.example"}).status_code == 403  # DNS rebinding
    assert not (project / "configs").exists()


def test_the_form_is_the_schema_grouped_as_llama_board_with_the_merged_defaults(project):
    page = client(project).get("/").text
    for key in forms.cfg.keys():
        assert f'id="field-{key}"' in page
    for group in forms.GROUPS:
        assert f'id="group-{group}"' in page
    fields = {f.key: f for f in forms.fields()}
    assert fields["cutoff_len"].value == 256 and fields["cutoff_len"].default == 2048  # config/config.yaml wins
    assert fields["lora_rank"].group == "LoRA" and fields["pref_beta"].group == "RLHF"
    assert fields["model_name_or_path"].group == "model" and fields["export_dir"].group == "export"
    assert fields["bf16"].choices == [True, False]
    nullable = [f for f in fields.values() if f.kind == "bool" and f.nullable]
    assert all(f.choices == [None, True, False] for f in nullable)
    # booleans are switches: on/off, and unset too where null is allowed, with the merged value checked
    switch = re.search(r'<fieldset class="switch" id="ddp_find_unused_parameters".*?</fieldset>', page, re.S).group(0)
    assert re.findall(r'value="(\w*)"( checked)?>(\w+)<', switch) == [("", " checked", "unset"), ("true", "", "on"),
                                                                    ("false", "", "off")]
    switch = re.search(r'<fieldset class="switch" id="double_quantization".*?</fieldset>', page, re.S).group(0)
    assert re.findall(r'value="(\w*)"( checked)?>', switch) == [("true", " checked"), ("false", "")]
    assert fields["resume_from_checkpoint"].kind == "text"  # a folder too, not only true/false/null
    select = re.search(r'<select name="quantization_bit".*?</select>', page, re.S).group(0)
    assert re.search(r'<option value="4" selected>', select)


def test_a_bad_value_is_shown_beside_its_field_and_nothing_runs(project):
    c = client(project)
    reply = c.post("/plan", data={"lora_rank": "many", "learning_rate": "fast", "target": "all"}).text
    assert re.search(r'id="error-lora_rank" hx-swap-oob="true"> — config key \'lora_rank\'', reply.replace("&#39;", "'"))
    assert "error-learning_rate" in reply and "Nothing runs until these are fixed" in reply
    assert not (project / "runs").exists()
    reply = c.post("/runs", data={"lora_rank": "0", "name": "r"}).text
    assert "error-lora_rank" in reply and not (project / "runs").exists()
    assert "letters, digits" in c.post("/save", data={"name": "../x"}).text


def test_only_changed_keys_are_kept_and_a_config_is_saved_and_loaded(project):
    changed, problems = forms.from_form({"lora_rank": "16", "cutoff_len": "256", "bf16": "false",
                                         "rope_scaling": "", "learning_rate": "5e-5", "bogus": "1"})
    assert problems == [] and changed == {"lora_rank": 16, "learning_rate": 5e-5}
    c = client(project)
    assert "saved configs/mine.yaml" in c.post("/save", data={"name": "mine", "lora_rank": "16"}).text
    assert yaml.safe_load((project / "configs" / "mine.yaml").read_text()) == {"lora_rank": 16}
    page = c.get("/?config=mine").text
    assert re.search(r'id="lora_rank" value="16"', page)


def test_plan_start_progress_loss_chart_and_the_plan_after_editing_a_key(project, tiny_model):
    c = client(project)
    form = tiny_form(tiny_model, max_steps=4, logging_steps=1)
    plan = c.post("/plan", data={**form, "name": "r1", "target": "results/adapter"}).text
    planned = set(re.findall(r'<tr class="job"><td>(\w+)</td>', plan))
    assert planned == {"base_model", "prepare_data", "tokenize", "train"}
    assert "Missing output files" in plan
    assert f"snakemake --configfile runs/r1/config.yaml --snakefile {REPO / 'Snakefile'} --cores all results/adapter" \
        in plan
    c.post("/runs", data={**form, "name": "r1", "target": "results/adapter"})
    assert wait_for(c, "r1", {"finished", "failed"}) == "finished"
    assert (project / "runs" / "r1" / "results" / "adapter" / "adapter_model.safetensors").is_file()
    page = c.get("/runs").text
    assert re.search(r"4/4 jobs, step 4 loss \d", page)
    # per-rule progress comes from Snakemake's own events (the board's logger plugin), not from its text output
    info = runs.status(project, "r1")
    assert {j["rule"]: j["state"] for j in info["rules"]} == dict.fromkeys(planned, "done")
    assert info["progress"] == {"done": 4, "total": 4} and "train ✓" in page
    with c.stream("GET", "/events") as stream:  # the same list, pushed as server-sent events
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = []
        for line in stream.iter_lines():
            if line == "" and lines:
                break
            lines.append(line)
    assert lines[0] == "event: runs" and all(line.startswith("data: ") for line in lines[1:])
    assert any('id="run-r1"' in line for line in lines) and any("4/4 jobs" in line for line in lines)
    # a new log line alone changes what the list pushes, and the list shows the log's last lines
    before = runs.signature(runs.list_runs(project))
    with open(project / "runs" / "r1" / "board.log", "a") as log:
        log.write("a new log line\n")
    assert runs.signature(runs.list_runs(project)) != before
    assert "a new log line" in c.get("/runs").text.split('id="run-r1"')[1]
    svg = c.get("/runs/r1/loss.svg")
    assert svg.headers["content-type"].startswith("image/svg+xml") and "<polyline" in svg.text
    again = c.post("/plan", data={**form, "name": "r1", "target": "results/adapter"}).text
    assert "Nothing to be done" in again
    edited = c.post("/plan", data={**form, "lora_rank": "4", "name": "r1", "target": "results/adapter"}).text
    assert set(re.findall(r'<tr class="job"><td>(\w+)</td>', edited)) == {"train"}
    edited = c.post("/plan", data={**form, "cutoff_len": "64", "name": "r1", "target": "results/adapter"}).text
    assert set(re.findall(r'<tr class="job"><td>(\w+)</td>', edited)) == {"tokenize", "train"}

    # a second run side by side, evaluated, then the two compared: config diff, curves overlaid, summaries
    c.post("/runs", data={**form, "lora_rank": "4", "name": "r2", "target": "evaluate"})
    assert wait_for(c, "r2", {"finished", "failed"}, timeout=600) == "finished"
    page = c.get("/compare?a=r1&b=r2").text
    assert re.search(r'<tr class="differs"><td>lora_rank</td><td>8</td><td>4</td>', page)
    assert page.count('<pre class="summary">') == 2 and "4 steps" in page and "(not evaluated" in page
    overlay = c.get("/compare.svg?a=r1&b=r2").text
    assert overlay.count("<polyline") == 2 and 'data-series="r1"' in overlay and 'data-series="r2"' in overlay
    assert c.get("/compare?a=r1&b=../../etc").status_code == 400

    # the run's page: evaluation summary, sample predictions of base and tuned, exports
    page = c.get("/runs/r2").text
    assert '<pre class="summary">' in page and "Sample predictions: tuned" in page and "Sample predictions: base" in page
    assert page.count("<tr><td><pre>") == 10  # 5 samples each
    assert "No exports yet" in page
    assert re.search(r"<td>results/adapter</td><td>train</td>", page)  # each artifact's provenance
    assert re.search(r"<td>results/eval/summary.md</td><td>eval_summary</td>", page)
    assert c.get("/runs/nothing").status_code == 404

    # chat with the run's merged model: streamed in pieces, by a worker process that holds the model
    import os

    with c.stream("POST", "/chat", data={"run": "r2", "model": "merged", "text": "Who are you?",
                                         "max_new_tokens": "8", "clear": "1"}) as reply:
        assert reply.status_code == 200
        pieces = list(reply.iter_text())
    assert len(pieces) >= 2 and "".join(pieces).strip()
    [worker] = runs._WORKERS.values()
    assert worker.proc.pid != os.getpid() and worker.proc.poll() is None
    assert "no results/export/gguf yet" in c.post("/chat", data={"run": "r2", "model": "gguf", "text": "hi"}).text
    # the adapter, unmerged on the run's base model, answers what the merged model answers (greedy)
    adapter = c.post("/chat", data={"run": "r2", "model": "adapter", "text": "Who are you?", "max_new_tokens": "8",
                                    "clear": "1"}).text
    assert adapter == "".join(pieces) and len(runs._WORKERS) == 2
    # the generation keys reach the worker: sampling at a high temperature leaves the greedy answer; a bad value
    # is refused by the schema's checks, naming the key, before it reaches the model
    chat = {"run": "r2", "model": "merged", "text": "Who are you?", "max_new_tokens": "8", "clear": "1"}
    sampled = c.post("/chat", data={**chat, "do_sample": "true", "temperature": "50", "top_k": "0"}).text
    assert sampled != adapter
    assert c.post("/chat", data={**chat, "do_sample": "false", "temperature": "50"}).text == adapter  # greedy again
    bad = c.post("/chat", data={**chat, "temperature": "hot"})
    assert bad.status_code == 400 and "temperature" in bad.text
    page = c.get("/").text
    chat_form = page[page.index('id="chatform"'):page.index("</form>", page.index('id="chatform"'))]
    assert re.findall(r'<label title="[^"]*">(\w+) ', chat_form)[:6] == list(forms.CHAT_KEYS)
    runs.close_workers()
    assert worker.proc.poll() is not None


def test_stop_leaves_no_complete_looking_output_and_no_lock(project, tiny_model):
    c = client(project)
    form = tiny_form(tiny_model, max_steps=100000, save_steps=100000)
    c.post("/runs", data={**form, "name": "long", "target": "results/adapter"})
    log = project / "runs" / "long" / "logs" / "train.log"
    deadline = time.time() + 300
    while not (log.is_file() and "trainable" in log.read_text()):
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    deadline = time.time() + 60
    while "<polyline" not in c.get("/runs/long/loss.svg").text:  # the curve drawn while it trains
        assert time.time() < deadline, "no live loss curve"
        time.sleep(0.2)
    c.post("/runs/long/stop")
    assert wait_for(c, "long", {"stopped"}, timeout=60) == "stopped"
    assert not (project / "runs" / "long" / "results" / "adapter").exists()
    assert not list((project / "runs" / "long" / ".snakemake" / "locks").glob("*"))
    assert (project / "runs" / "long" / "results" / "tokenized").is_dir()  # finished steps stay


def test_the_loss_curve_is_a_server_rendered_svg():
    svg = svg_curve({"training": [(1, 2.0), (2, 1.5), (3, 1.0)], "validation": [(3, 1.2)]})
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 and "step 3" in svg
    assert "no loss logged yet" in svg_curve({"training": []})
    with pytest.raises(ValueError):
        runs.checked_target("results/../../etc")


def test_tuneline_board_serves_on_loopback_with_a_printed_token_and_exits_on_sigterm(project):
    import http.cookiejar
    import os
    import signal
    import socket
    import subprocess
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tuneline = REPO / ".venv" / "bin" / "tuneline"
    proc = subprocess.Popen([str(tuneline), "board", "--port", str(port), "--project", str(project)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"(http://127\.0\.0\.1:\d+/\?token=\S+)", line).group(1)
        for _ in range(100):  # the URL is printed just before uvicorn listens
            try:
                with pytest.raises(urllib.error.HTTPError) as denied:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/")
                break
            except urllib.error.URLError as err:
                if isinstance(err, urllib.error.HTTPError):
                    raise
                time.sleep(0.1)
        assert denied.value.code == 403
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        with opener.open(url) as page:
            assert page.status == 200 and "Tuneline board" in page.read().decode()
        start = time.time()
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=15) is not None and time.time() - start < 15
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_list_key_is_a_comma_separated_field():
    fields = {f.key: f for f in forms.fields()}
    assert fields["export_gguf_types"].kind == "list" and fields["export_gguf_types"].value == "q8_0, q4_0, f16"
    assert forms.from_form({"export_gguf_types": "q8_0, q4_0, f16"}) == ({}, [])
    assert forms.from_form({"export_gguf_types": "f16"})[0] == {"export_gguf_types": ["f16"]}
    assert forms.from_form({"export_gguf_types": "q9"})[1][0][0] == "export_gguf_types"


def test_dataset_preview_shows_the_first_records_of_each_selected_dataset(project):
    from conftest import LF_DATA

    c = client(project)
    preview = c.post("/preview", data={"dataset_dir": str(LF_DATA), "dataset": "alpaca_en_demo,identity"}).text
    assert "alpaca_en_demo: first 3 records" in preview and "instruction" in preview and "identity: first 3" in preview
    assert "Did you mean alpaca_en_demo" in c.post("/preview", data={"dataset_dir": str(LF_DATA),
                                                                      "dataset": "alpaca_en_dem"}).text


def test_evaluate_and_export_tabs_launch_more_targets_of_a_run(project, tiny_model):
    c = client(project)
    assert "no run nope" in c.post("/runs/nope/launch", data={"targets": "evaluate"}).text
    c.post("/runs", data={**tiny_form(tiny_model, max_steps=2), "name": "t1", "target": "results/merged_model"})
    assert wait_for(c, "t1", {"finished", "failed"}) == "finished"
    assert "<option selected>t1</option>" in c.get("/run-options?run=t1").text  # selects list runs started later
    assert "target &#x27;results/../x&#x27;: one of all" in c.post("/runs/t1/launch", data={"targets": "results/../x"}).text
    page = c.post("/runs/t1/launch", data={"targets": ["results/export/bnb-8bit", "evaluate"]}).text
    assert "started results/export/bnb-8bit evaluate in run t1" in page
    assert wait_for(c, "t1", {"finished", "failed"}, timeout=600) == "finished"
    info = runs.status(project, "t1")
    assert {"export_bnb", "predict", "eval_summary"} <= {j["rule"] for j in info["rules"]}
    assert "train" not in {j["rule"] for j in info["rules"]}  # the run's own config: nothing upstream reruns
    page = c.get("/runs/t1").text
    assert '<pre class="summary">' in page and "bnb-8bit" in page and "No exports yet" not in page


def test_the_plan_worker_plans_what_snakemake_plans_and_restarts_after_it_dies(project, tiny_model):
    import os
    import signal
    import subprocess

    changed = tiny_config(tiny_model, REPO / "resources")
    plan = runs.plan(project, changed, "results/merged_model")
    worker = runs.plan_worker()
    # the command line's own dry run of the same config file plans the same rules for the same reasons
    argv = runs.command("runs/plan/plan.yaml", "results/merged_model", dry_run=True)
    output = subprocess.run(argv, cwd=project, capture_output=True, text=True, check=True).stdout
    assert [job["rule"] for job in plan["jobs"]] == re.findall(r"^(?:local)?rule (\w+):", output, re.M)
    assert plan["ok"] and len(plan["jobs"]) == 5 and all(job["reason"] for job in plan["jobs"])
    # a dry run that fails (a bad registry) says why, and the next plan is not affected by it
    bad = runs.plan(project, {**changed, "dataset_dir": str(project)}, "results/merged_model")
    assert not bad["ok"] and "dataset_info.json not found" in bad["output"]
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait()
    again = runs.plan(project, changed, "results/merged_model")  # (a reason's file order is a set's order)
    assert [job["rule"] for job in again["jobs"]] == [job["rule"] for job in plan["jobs"]]
    assert runs.plan_worker().proc.pid != worker.proc.pid
    runs.close_workers()
