"""The rating page's web app (Flask): the page, the rater's state, the images under opaque ids, and the votes.

    GET  /                   the page (static/index.html; its script and style are served from static/ too)
    GET  /api/state?rater=R  R's CSRF token, criteria, items in R's order (caption, opaque image ids for the
                             reference, A and B) and R's answers so far, as A/B/tie
    GET  /img/ID             an image by its opaque id (no file name, no ETag, no hint of its model)
    POST /api/vote           {"rater", "item", "criterion", "answer": "A" | "B" | "tie"}, X-CSRF-Token header

A vote is refused with 4xx and nothing written when any of it is wrong: an unknown item or criterion, an answer
other than A, B or tie, a CSRF token missing or not the rater's, a body that is not JSON or over 2 KiB. The token
is an HMAC of the rater id, readable only by a page of this origin (no CORS), so another site cannot vote.
"""

import hashlib
import hmac
import mimetypes
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, Response, abort, jsonify, request, send_from_directory

from lanskap.rate import votes as db
from lanskap.rate.items import Item, item_id, opaque_id, rater_plan

STATIC = Path(__file__).parent / "static"
RATER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
MAX_BODY = 2048
VOTE_KEYS = {"rater", "item", "criterion", "answer"}
SECURITY_HEADERS = {
    # everything from this origin: the page works offline and loads nothing from elsewhere
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass
class Panel:
    """What the app serves: the items, the criteria (name -> question), the seed of the sides, the database."""

    items: list[Item]
    criteria: dict[str, str]
    seed: int
    connection: object
    lock: threading.Lock

    def __post_init__(self):
        self.key = db.secret(self.connection)
        self.by_id = {item_id(self.key, item): n for n, item in enumerate(self.items)}
        self.images = {}
        for item in self.items:
            for path, digest in ((item.base, item.base_sha256), (item.lora, item.lora_sha256)):
                self.images[opaque_id(self.key, digest)] = path
            self.images[opaque_id(self.key, "reference:" + str(item.reference))] = item.reference

    def image_id(self, item: Item, which: str) -> str:
        if which == "reference":
            return opaque_id(self.key, "reference:" + str(item.reference))
        return opaque_id(self.key, item.lora_sha256 if which == "lora" else item.base_sha256)

    def token(self, rater: str) -> str:
        return hmac.new(self.key, b"csrf:" + rater.encode(), hashlib.sha256).hexdigest()


def rater_state(panel: Panel, rater: str) -> dict:
    """The rater's items in their order, A and B by opaque id, and their answers so far (on the current images)."""
    order, sides = rater_plan(panel.items, rater, panel.seed)
    items, current = [], {}
    for n in order:
        item = panel.items[n]
        left, right = ("lora", "base") if sides[n] == "left" else ("base", "lora")
        identifier = item_id(panel.key, item)
        current[item.prompt_index, item.sample, item.base_sha256, item.lora_sha256] = (identifier, sides[n])
        items.append(
            {
                "id": identifier,
                "caption": item.caption,
                "reference": panel.image_id(item, "reference"),
                "a": panel.image_id(item, left),
                "b": panel.image_id(item, right),
            }
        )
    answers: dict[str, dict[str, str]] = {}
    with panel.lock:
        rows = db.rater_answers(panel.connection, rater)
    for prompt_index, sample, base_sha, lora_sha, criterion, answer, side in rows:
        if (prompt_index, sample, base_sha, lora_sha) in current and criterion in panel.criteria:
            identifier, side_now = current[prompt_index, sample, base_sha, lora_sha]
            if side != side_now and answer != "tie":  # the seed changed since: the same choice, the other letter
                answer = "B" if answer == "A" else "A"
            answers.setdefault(identifier, {})[criterion] = answer
    criteria = [{"name": name, "question": question} for name, question in panel.criteria.items()]
    return {"token": panel.token(rater), "criteria": criteria, "items": items, "answers": answers}


def checked_vote(panel: Panel) -> db.Vote:
    """The request's vote, or abort with the 4xx that says what is wrong."""
    if request.mimetype != "application/json":
        abort(415, "send the vote as application/json")
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or set(body) != VOTE_KEYS or not all(isinstance(v, str) for v in body.values()):
        abort(400, f"a vote is a JSON object of strings with exactly the keys {sorted(VOTE_KEYS)}")
    if not RATER_ID.fullmatch(body["rater"]):
        abort(400, "rater ids are 1-32 letters, digits, '.', '_' or '-'")
    token = request.headers.get("X-CSRF-Token", "")
    if not hmac.compare_digest(token.encode(), panel.token(body["rater"]).encode()):
        abort(403, "missing or wrong CSRF token: reload the page")
    position = panel.by_id.get(body["item"])
    if position is None:
        abort(404, "unknown item: the images may have changed; reload the page")
    if body["criterion"] not in panel.criteria:
        abort(400, "unknown criterion")
    if body["answer"] not in db.ANSWERS:
        abort(400, f"an answer is one of {list(db.ANSWERS)}")
    item, side = panel.items[position], rater_plan(panel.items, body["rater"], panel.seed)[1][position]
    return db.Vote(
        body["rater"], item.prompt_index, item.sample, item.caption, item.base_sha256, item.lora_sha256, side,
        body["criterion"], body["answer"],
    )  # fmt: skip


def create_app(panel: Panel) -> Flask:
    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY

    @app.get("/")
    def page():
        return send_from_directory(STATIC, "index.html")

    @app.get("/favicon.ico")
    def no_icon():
        return Response(status=204)

    @app.get("/api/state")
    def state():
        rater = request.args.get("rater", "")
        if not RATER_ID.fullmatch(rater):
            abort(400, "rater ids are 1-32 letters, digits, '.', '_' or '-'")
        return jsonify(rater_state(panel, rater))

    @app.get("/img/<image>")
    def image(image: str):
        path = panel.images.get(image)
        if path is None:
            abort(404, "unknown image")
        return Response(path.read_bytes(), mimetype=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    @app.post("/api/vote")
    def vote():
        cast = checked_vote(panel)
        with panel.lock:
            db.record(panel.connection, cast)
        return jsonify({"ok": True})

    @app.errorhandler(400)
    @app.errorhandler(403)
    @app.errorhandler(404)
    @app.errorhandler(405)
    @app.errorhandler(413)
    @app.errorhandler(415)
    def refused(error):
        return jsonify({"error": error.description}), error.code

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers.update(SECURITY_HEADERS)
        return response

    return app
