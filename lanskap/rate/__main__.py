"""`python -m lanskap.rate` (`make rate`): serve the blind rating page for the current generated images.

Serves on 127.0.0.1 only, unless --allow-remote: the page is not meant for a network (no accounts, no TLS).
Ctrl-C stops it and folds the votes into the database file, ready to commit:
    git add ratings/votes.sqlite && git commit -m "ratings" && dvc repro qualitative
"""

import argparse
import signal
import sys
import threading
from pathlib import Path

from werkzeug.serving import make_server

from lanskap.core.errors import UserError, run_stage
from lanskap.core.params import load_params
from lanskap.rate import votes as db
from lanskap.rate.items import check_references, read_items
from lanskap.rate.server import Panel, create_app

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def check_host(host: str, allow_remote: bool) -> None:
    if host not in LOOPBACK and not allow_remote:
        raise UserError(
            f"rate: refusing to serve on {host}: anyone who reaches it could vote. Serve on 127.0.0.1 (the "
            "default), or pass --allow-remote if you mean it"
        )


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0: any free port (the URL printed says which)")
    parser.add_argument("--allow-remote", action="store_true", help="allow a --host beyond this machine")
    parser.add_argument("--votes", type=Path, default=db.DEFAULT_VOTES)
    parser.add_argument("--generated", type=Path, default=Path("data/generated"))
    args = parser.parse_args(argv)
    check_host(args.host, args.allow_remote)
    params = load_params("rate")["rate"]

    items = read_items(args.generated / "index.csv")
    check_references(items, args.generated / "index.csv")
    connection, lock = db.connect(args.votes, create=True), threading.Lock()
    try:
        panel = Panel(items, dict(params.criteria), params.seed, connection, lock)
        server = make_server(args.host, args.port, create_app(panel), threaded=True)
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"rating {len(items)} items on {len(params.criteria)} criteria; votes -> {args.votes}")
        print(f"open http://{host}:{server.server_port}/  (Ctrl-C to stop)", flush=True)
        signal.signal(signal.SIGTERM, stop_on_sigterm)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    finally:
        with lock:  # a vote in flight finishes first
            db.close(connection)
    print(f"stopped; votes saved in {args.votes} (commit it with the experiment)", file=sys.stderr)


if __name__ == "__main__":
    run_stage(main)
