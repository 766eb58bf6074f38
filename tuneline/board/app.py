"""The board's Starlette app: routes, and the middleware that checks Host, Origin and the token."""

from __future__ import annotations

import contextlib
import hmac
import logging
import secrets
import threading
from html import escape
from pathlib import Path
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from . import forms, runs

log = logging.getLogger("tuneline.board")

HERE = Path(__file__).parent
COOKIE = "tuneline_board"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
KEYS = list(forms.cfg.keys())


class Guard:
    """403 unless the Host is the board's own, any Origin is the board's own, and the token came (once, as
    ?token= in the printed URL, which sets a SameSite=Strict cookie and redirects to the page without it)."""

    def __init__(self, app, token: str, hosts: set[str]):
        self.app, self.token, self.hosts = app, token, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        host = request.headers.get("host", "")
        origin = request.headers.get("origin")
        if host not in self.hosts or (origin is not None and urlsplit(origin).netloc not in self.hosts):
            return await PlainTextResponse("forbidden: not this board's host or origin", 403)(scope, receive, send)
        given = request.query_params.get("token")
        if given is not None and hmac.compare_digest(given, self.token):
            response = RedirectResponse(request.url.remove_query_params("token"), 303)
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
            return await response(scope, receive, send)
        if not hmac.compare_digest(request.cookies.get(COOKIE, ""), self.token):
            return await PlainTextResponse("forbidden: open the URL with the token that `tuneline board` printed",
                                           403)(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(project: Path, token: str | None = None, hosts: set[str] | None = None) -> Starlette:
    project = Path(project).resolve()
    token = token or secrets.token_urlsafe(24)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals["log_lines"] = runs.LOG_LINES

    async def index(request: Request):
        loaded, problem = {}, None
        name = request.query_params.get("config")
        if name:
            try:
                loaded = forms.cfg.load_config_file(project / "configs" / f"{runs.checked_name(name)}.yaml")
            except (ValueError, forms.cfg.TunelineError) as err:
                problem = str(err)
        return templates.TemplateResponse(request, "index.html", {
            "groups": forms.GROUPS, "fields": forms.fields(loaded), "targets": runs.TARGETS, "problem": problem,
            "exports": runs.EXPORTS, "chat_keys": forms.CHAT_KEYS,
            "runs": runs.list_runs(project), "configs": sorted(p.stem for p in (project / "configs").glob("*.yaml"))})

    def problems_page(request: Request, problems: list):
        """The problems listed, each also beside its field (htmx out-of-band swaps)."""
        return templates.TemplateResponse(request, "problems.html", {"problems": problems, "keys": KEYS})

    def two_runs(request: Request) -> list[str]:
        return [runs.checked_name(request.query_params.get(k, "")) for k in ("a", "b")]

    async def submitted(request: Request):
        form = dict(await request.form())
        changed, problems = forms.from_form(form)
        return form, changed, problems

    async def check_plan(request: Request):
        form, changed, problems = await submitted(request)
        if problems:
            return problems_page(request, problems)
        try:
            result = await run_in_threadpool(runs.plan, project, changed, form.get("target", "all"),
                                             form.get("name") or "plan")
        except ValueError as err:
            return problems_page(request, [(None, str(err))])
        return templates.TemplateResponse(request, "plan.html", {"plan": result, "yaml": forms.to_yaml(changed),
                                                                 "keys": KEYS})

    async def save(request: Request):
        form, changed, problems = await submitted(request)
        if problems:
            return problems_page(request, problems)
        try:
            name = runs.checked_name(form.get("name", ""))
        except ValueError as err:
            return problems_page(request, [("name", str(err))])
        (project / "configs").mkdir(exist_ok=True)
        (project / "configs" / f"{name}.yaml").write_text(forms.to_yaml(changed))
        return HTMLResponse(f"<p class=ok>saved configs/{name}.yaml</p>")

    async def start(request: Request):
        form, changed, problems = await submitted(request)
        if problems:
            return problems_page(request, problems)
        try:
            runs.start(project, form.get("name", ""), changed, form.get("target", "all"))
        except ValueError as err:
            return problems_page(request, [("name", str(err))])
        return templates.TemplateResponse(request, "runs.html", {"runs": runs.list_runs(project)})

    async def run_list(request: Request):
        return templates.TemplateResponse(request, "runs.html", {"runs": runs.list_runs(project)})

    async def event_stream(request: Request):
        """Server-sent events: the run list (rendered) whenever a run's events, loss, log or state change; the
        page swaps it in (htmx's SSE extension). Checked every second, sent only on change."""
        import asyncio

        async def stream():
            last = None
            while not await request.is_disconnected():
                listed = await run_in_threadpool(runs.list_runs, project)
                signature = runs.signature(listed)
                if signature != last:
                    last = signature
                    html = templates.get_template("runs.html").render(runs=listed)
                    yield "event: runs\n" + "".join(f"data: {line}\n" for line in html.splitlines()) + "\n"
                await asyncio.sleep(1)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    async def launch(request: Request):
        """The Evaluate and Export tabs: more targets of an existing run (its own config.yaml)."""
        form = await request.form()
        try:
            runs.launch(project, request.path_params["name"], form.getlist("targets"))
        except ValueError as err:
            return HTMLResponse(f"<p class=error>{escape(str(err))}</p>")
        name = escape(request.path_params["name"])
        return HTMLResponse(f'<p class=ok>started {escape(" ".join(form.getlist("targets")))} in run {name}: progress '
                            f'under Runs; results on <a href="/runs/{name}">its page</a></p>')

    async def run_options(request: Request):
        """<option>s of the runs there are now, the ones named in the query kept selected (a select refreshed
        when it gets focus, so runs started after the page loaded are listed)."""
        chosen = set(request.query_params.values())
        return HTMLResponse("".join(f'<option{" selected" if r["name"] in chosen else ""}>{escape(r["name"])}</option>'
                                    for r in runs.list_runs(project)))

    async def stop(request: Request):
        try:
            runs.stop(project, request.path_params["name"])
        except (ValueError, FileNotFoundError) as err:
            return PlainTextResponse(str(err), 404)
        return templates.TemplateResponse(request, "runs.html", {"runs": runs.list_runs(project)})

    async def loss_svg(request: Request):
        try:
            info = runs.status(project, request.path_params["name"])
        except ValueError as err:
            return PlainTextResponse(str(err), 404)
        return Response(svg_curve({"training": info["loss"], "validation": info["eval_loss"]}),
                        media_type="image/svg+xml", headers={"Cache-Control": "no-store"})

    async def compare(request: Request):
        try:
            names = two_runs(request)
        except ValueError as err:
            return PlainTextResponse(str(err), 400)
        return templates.TemplateResponse(request, "compare.html", runs.compare(project, *names))

    async def compare_svg(request: Request):
        try:
            names = two_runs(request)
        except ValueError as err:
            return PlainTextResponse(str(err), 400)
        curves = {name: runs.loss_curves(project / "runs" / name)[0] for name in names}
        return Response(svg_curve(curves), media_type="image/svg+xml", headers={"Cache-Control": "no-store"})

    async def run_page(request: Request):
        try:
            info = runs.details(project, request.path_params["name"])
        except ValueError as err:
            return PlainTextResponse(str(err), 404)
        if info["state"] == "none":
            return PlainTextResponse("no such run", 404)
        return templates.TemplateResponse(request, "run.html", {"run": info, "targets": runs.TARGETS})

    async def preview(request: Request):
        """The first records of the selected registry datasets, as prepare_data reads them."""
        from ..records import load_records
        from ..registry import selected_entries

        form = dict(await request.form())
        merged = {**forms.workflow_config(), **forms.from_form(form)[0]}
        shown = {}
        try:
            for name, entry in selected_entries(merged["dataset_dir"], merged["dataset"]).items():
                shown[name] = load_records(name, entry, merged["dataset_dir"], log)[:3]
        except forms.cfg.TunelineError as err:
            return problems_page(request, [("dataset", str(err))])
        return templates.TemplateResponse(request, "preview.html", {"datasets": shown})

    async def chat(request: Request):
        """The reply streamed as it is generated (text/plain chunks), by the run's chat worker process."""
        form = dict(await request.form())
        try:
            worker = await run_in_threadpool(runs.chat_worker, project, form.get("run", ""), form.get("model", "merged"))
        except ValueError as err:
            return PlainTextResponse(str(err), 400)
        generation, problems = forms.chat_generation(form)
        if problems:
            return PlainTextResponse("; ".join(message for _, message in problems), 400)
        request_line = {"text": form.get("text", ""), "system": form.get("system", ""), "generation": generation,
                        "clear": form.get("clear") == "1"}
        replies = worker.ask(request_line)

        async def pieces():
            while True:
                message = await run_in_threadpool(next, replies, None)
                if message is None or "done" in message:
                    return
                yield message.get("piece") or f"[error: {message.get('error')}]"

        return StreamingResponse(pieces(), media_type="text/plain; charset=utf-8",
                                 headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    routes = [Route("/", index), Route("/chat", chat, methods=["POST"]), Route("/runs/{name}", run_page), Route("/preview", preview, methods=["POST"]), Route("/compare", compare), Route("/compare.svg", compare_svg), Route("/plan", check_plan, methods=["POST"]), Route("/save", save, methods=["POST"]),
              Route("/runs", run_list), Route("/runs", start, methods=["POST"]), Route("/events", event_stream),
              Route("/runs/{name}/launch", launch, methods=["POST"]), Route("/run-options", run_options),
              Route("/runs/{name}/stop", stop, methods=["POST"]), Route("/runs/{name}/loss.svg", loss_svg),
              Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=runs.plan_worker, daemon=True).start()  # warm before the first plan
        yield
        runs.close_workers()  # the models and the plan worker live in processes of their own: end them too

    app = Starlette(routes=routes, middleware=[Middleware(Guard, token=token, hosts=hosts or {"testserver"})],
                    lifespan=lifespan)
    app.state.token = token
    return app


COLORS = ("#2a6", "#c52", "#36c", "#a3a")


def svg_curve(series: dict[str, list[tuple[float, float]]], width: int = 480, height: int = 200) -> str:
    """Loss curves as one server-rendered SVG (no plotting library in the page): a polyline per series,
    on shared axes, with a legend."""
    series = {label: points for label, points in series.items() if points}
    if not series:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
                '<text x="10" y="20">no loss logged yet</text></svg>')
    every = [p for points in series.values() for p in points]
    x0, x1 = min(p[0] for p in every), max(p[0] for p in every)
    y0, y1 = min(p[1] for p in every), max(p[1] for p in every)
    sx, sy = (width - 50) / ((x1 - x0) or 1), (height - 40) / ((y1 - y0) or 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="loss">']
    for i, (label, points) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        line = " ".join(f"{40 + (x - x0) * sx:.1f},{20 + (y1 - y) * sy:.1f}" for x, y in points)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{line}" data-series="{escape(label)}"/>')
        parts.append(f'<text x="{60 + 130 * i}" y="12" font-size="11" fill="{color}">{escape(label)}</text>')
    parts.append(f'<text x="2" y="24" font-size="11">{y1:.3g}</text>'
                 f'<text x="2" y="{height - 18}" font-size="11">{y0:.3g}</text>'
                 f'<text x="{width - 70}" y="{height - 4}" font-size="11">step {x1:g}</text></svg>')
    return "".join(parts)
