"""The web dashboard: three pages and their scripts, served without a key.

The pages hold no data. The browser asks the user for an API key once, keeps it in
localStorage, and fetches everything from the JSON API with it, so the dashboard sees exactly
what the key's owner may see and nothing is rendered from data on the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

from app.errors import NotFound

STATIC = Path(__file__).parent / "static"
ASSET_TYPES = {".js": "text/javascript", ".css": "text/css"}

# Scripts and styles come only from /ui/static, and the pages fetch only this origin: a
# message or answer that slipped into the DOM as markup still could not run or send anything.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate on each load, so an upgraded service never runs last version's scripts.
    "Cache-Control": "no-cache",
}

router = APIRouter(prefix="/ui", tags=["dashboard"], include_in_schema=False)


@dataclass(frozen=True)
class Page:
    title: str
    content: str  # the file holding the page's <main>
    script: str


JOBS = Page("Jobs", "jobs.html", "jobs.js")
JOB = Page("Job", "job.html", "job.js")
PLAYGROUND = Page("Playground", "playground.html", "playground.js")


def render(page: Page) -> HTMLResponse:
    """The shared layout (header, sign-in form) around the page's content. Nothing from the
    request goes in: the job page reads its job id from the address itself."""
    html = (
        (STATIC / "layout.html")
        .read_text()
        .replace("{{title}}", page.title)
        .replace("{{script}}", page.script)
        .replace("{{content}}", (STATIC / page.content).read_text())
    )
    return HTMLResponse(html, headers=SECURITY_HEADERS)


@router.get("")
def jobs_page() -> HTMLResponse:
    return render(JOBS)


@router.get("/jobs/{job_id}")
def job_page() -> HTMLResponse:
    """The job id in the path is read by the page's script."""
    return render(JOB)


@router.get("/playground")
def playground_page() -> HTMLResponse:
    return render(PLAYGROUND)


@router.get("/static/{name}")
def asset(name: str) -> FileResponse:
    path = STATIC / name
    if path.suffix not in ASSET_TYPES or not path.is_file():
        raise NotFound(f"No dashboard file {name!r}.")
    return FileResponse(path, media_type=ASSET_TYPES[path.suffix], headers=SECURITY_HEADERS)
