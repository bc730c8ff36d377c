"""The `ccd` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO, TypeVar

from client.api import ApiError, Client, ConnectionFailed, Event, NotFound, Unavailable
from client.approve import Approver, is_terminal
from client.batch_run import ResultsFile, read_prompts, reattach, run_batch
from client.console import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_NOT_FOUND, EXIT_OK, EXIT_UNAVAILABLE,
                            EXIT_USAGE, UsageError, say)
from client.tokens import mint_token

DEFAULT_URL = "http://127.0.0.1:8000"
T = TypeVar("T")
EPILOG = """\
environment:
  CCD_URL      the API's base URL (default http://127.0.0.1:8000); --url overrides it
  CCD_TOKEN    the API token (mint one with `ccd token`); --token overrides it
  JWT_SECRET   the server's secret, read by `ccd token` only

exit codes:
  0    success
  1    the turn or batch ran but had failures (failed, cancelled, timed out)
  2    usage or validation error (a 4xx answer other than 404)
  3    the server or the connection is unavailable (5xx, refused, broken)
  4    not found (404)
  130  interrupted (Ctrl-C)
"""


# -- helpers ------------------------------------------------------------------------------------

def client_of(args: argparse.Namespace) -> Client:
    """The API client for the --url and --token of the command line."""
    if not args.token:
        raise UsageError("no token: pass --token or export CCD_TOKEN (mint one with `ccd token`)")
    return Client(args.url, args.token)


def print_json(value: Any, out: TextIO = sys.stdout) -> None:
    """Prints a value as indented JSON."""
    print(json.dumps(value, indent=2), file=out)


def exit_code_of(exc: ApiError) -> int:
    """The exit code that an API error maps to."""
    if isinstance(exc, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(exc, (ConnectionFailed, Unavailable)) or exc.status >= 500:
        return EXIT_UNAVAILABLE
    return EXIT_USAGE


# -- token --------------------------------------------------------------------------------------

def cmd_token(args: argparse.Namespace) -> int:
    """Prints a token for --sub, valid for --ttl seconds, signed with JWT_SECRET."""
    secret = os.environ.get("JWT_SECRET", "")
    if not secret:
        print("error: JWT_SECRET is not set; export the server's secret first", file=sys.stderr)
        return 2
    try:
        print(mint_token(secret, args.sub, args.ttl, audience=os.environ.get("JWT_AUDIENCE", ""),
                         issuer=os.environ.get("JWT_ISSUER", "")))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    """Revokes the token in use, or --jti (until --exp): the server refuses it from then on."""
    if (args.jti is None) != (args.exp is None):
        raise UsageError("--jti and --exp go together")
    body = {"jti": args.jti, "exp": args.exp} if args.jti else {}
    answer = client_of(args).call("POST", "/tokens/revoke", json=body)
    print(f"{answer['jti']} {'revoked' if answer['revoked'] else 'already expired'}")
    return EXIT_OK


# -- sessions -----------------------------------------------------------------------------------

def cmd_sessions_create(args: argparse.Namespace) -> int:
    """Creates a session and prints its id (or the whole session with --json)."""
    config = {"model": args.model} if args.model else {}
    session = client_of(args).create_session(config, workspace=args.workspace)
    if args.json:
        print_json(session)
    else:
        print(session["id"])
    return EXIT_OK


def config_of(text: str | None) -> dict:
    """The --config JSON object of the command line."""
    return json_object_of(text, "--config", '{"model": "claude-haiku-4-5"}') or {}


def json_object_of(text: str | None, flag: str, example: str) -> dict | None:
    """The JSON object a flag carries, or None when the flag was not given."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{flag} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} must be a JSON object, like '{example}'")
    return value


def cmd_sessions_spawn(args: argparse.Namespace) -> int:
    """Spawns a child session and prints its id (or the child with its first turn, with --json)."""
    config = config_of(args.config)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    child = client_of(args).spawn(args.id, prompt, config, args.workspace)
    if args.json:
        print_json(child)
        return EXIT_OK
    print(child["id"])
    if child.get("turn"):
        say(f"turn {child['turn']['id']} {child['turn']['status']}")
    return EXIT_OK


def tree_lines(nodes: list[dict], level: int = 1) -> Iterator[str]:
    """One line per session of a nested children listing, indented by its level below the top."""
    for node in nodes:
        yield tree_line(node, level)
        yield from tree_lines(node.get("children") or [], level + 1)


def tree_line(session: dict, level: int) -> str:
    """A session as one line of `ccd sessions tree`: id, status, depth and its latest turn's status."""
    latest = session.get("latest_turn") or {}
    return f"{'  ' * level}{session['id']}  {session['status']:<9} depth={session['depth']}  " \
           f"turn={latest.get('status') or '-'}"


def cmd_sessions_tree(args: argparse.Namespace) -> int:
    """Prints a session and every session below it, indented (or as nested JSON with --json)."""
    client = client_of(args)
    top = client.session(args.id)
    below = client.children(args.id, recursive=True)
    if args.json:
        print_json({**top, "children": below["items"], "tree_cost_usd": below.get("tree_cost_usd")})
        return EXIT_OK
    print(tree_line(top, 0))
    for line in tree_lines(below["items"]):
        print(line)
    if below.get("tree_cost_usd") is not None:
        say(f"(cost of the whole spawn tree: ${below['tree_cost_usd']:.4f})")
    return EXIT_OK


def cmd_sessions_list(args: argparse.Namespace) -> int:
    """Prints the owner's sessions, one per line (or the page as JSON with --json)."""
    page = client_of(args).list_sessions(args.status, args.limit, args.offset)
    if args.json:
        print_json(page)
        return EXIT_OK
    for s in page["items"]:
        print(f"{s['id']}  {s['status']:<9} turns={s['turn_count']:<4} "
              f"model={s['config'].get('model') or '-'}  created={s['created_at']}")
    if page.get("next_offset") is not None:
        say(f"({page['total']} in all; more with --offset {page['next_offset']})")
    return EXIT_OK


def cmd_sessions_show(args: argparse.Namespace) -> int:
    """Prints one session as JSON."""
    print_json(client_of(args).session(args.id))
    return EXIT_OK


def cmd_sessions_stop(args: argparse.Namespace) -> int:
    """Stops a session's container."""
    session = client_of(args).stop_session(args.id)
    print(f"{session['id']} {session['status']}")
    return EXIT_OK


def cmd_sessions_rm(args: argparse.Namespace) -> int:
    """Deletes a session."""
    session = client_of(args).delete_session(args.id)
    print(f"{session['id']} {session['status']}")
    return EXIT_OK


# -- chat and tail ------------------------------------------------------------------------------

def text_delta(event: Event) -> str | None:
    """The assistant text a `claude.stream_event` carries, if it is a text delta."""
    if event.get("type") != "claude.stream_event":
        return None
    inner = (event.get("data") or {}).get("event") or {}
    delta = inner.get("delta") or {}
    if inner.get("type") == "content_block_delta" and delta.get("type") == "text_delta":
        return delta.get("text") or ""
    return None


def turn_summary(data: dict) -> str:
    """A one-line account of a finished turn from its final event's data."""
    parts = [data.get("status") or "?"]
    if data.get("duration_ms") is not None:
        parts.append(f"{data['duration_ms'] / 1000:.1f}s")
    if data.get("cost_usd") is not None:
        parts.append(f"${data['cost_usd']:.4f}")
    if data.get("error"):
        parts.append(f"error: {data['error']}")
    return "[" + ", ".join(parts) + "]"


def cmd_chat(args: argparse.Namespace) -> int:
    """Sends a prompt and streams the answer; asks on the terminal when a tool needs approval (or says
    how to answer without one); Ctrl-C cancels the turn."""
    client = client_of(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    approver = Approver(client, interactive=args.prompt != "-" and is_terminal(sys.stdin))
    turn_id, streamed, mid_line, final = None, False, False, None
    try:
        for event in client.chat_stream(args.session, prompt):
            turn_id = event.get("turn_id") or turn_id
            if args.json:
                print(json.dumps(event), flush=True)
                approver.handle(event)
            elif (text := text_delta(event)) is not None:
                streamed, mid_line = True, (not text.endswith("\n")) if text else mid_line
                print(text, end="", flush=True)
            elif str(event.get("type")).startswith("approval."):
                if mid_line:  # the question goes on a line of its own
                    print(flush=True)
                    mid_line = False
                approver.handle(event)
            if event.get("type") in ("turn.completed", "turn.failed", "turn.cancelled"):
                final = event
    except KeyboardInterrupt:
        cancel_quietly(client, turn_id)
        raise
    return finish_chat(final, streamed, args.json)


def finish_chat(final: Event | None, streamed: bool, raw: bool) -> int:
    """Prints the result (unless it was streamed) and the final status; returns the exit code."""
    data = (final or {}).get("data") or {}
    if not raw:
        if streamed:
            print(flush=True)
        elif data.get("result"):
            print(data["result"], flush=True)
        say(turn_summary(data) if final else "[the stream ended before the turn did]")
    if final is None:
        return EXIT_UNAVAILABLE
    return EXIT_OK if data.get("status") == "succeeded" else EXIT_FAILED


def cancel_quietly(client: Client, turn_id: str | None) -> None:
    """Best effort: cancels the turn a Ctrl-C abandoned."""
    if turn_id:
        try:
            client.cancel(turn_id)
            say(f"\ncancelled turn {turn_id}")
        except ApiError:
            pass


def event_line(event: Event) -> str:
    """One line describing an event: id, type, turn, and a short summary of its data."""
    data = event.get("data") or {}
    detail = text_delta(event)
    if detail is None:
        if "status" in data:
            detail = str(data["status"]) + (f" ({data['error']})" if data.get("error") else "")
        elif event.get("type") == "turn.queued" or "prompt" in data:
            detail = data.get("prompt", "")
        else:
            detail = data.get("subtype") or data.get("message") or ""
    if str(event.get("type")).startswith("approval."):
        detail = f"{data.get('request_id')} {data.get('tool_name') or data.get('status')}"
        detail += f" by {data['decided_by']}" if data.get("decided_by") else ""
    turn = (event.get("turn_id") or "-")[:8]
    return f"{event.get('id') or '-'}  {event.get('type')}  turn={turn}  {json.dumps(detail)[:120]}"


def cmd_tail(args: argparse.Namespace) -> int:
    """Follows a session's events, resuming after dropped connections, until it is deleted."""
    with client_of(args).events(args.session, since=args.since) as follower:
        for event in follower:
            print(json.dumps(event) if args.json else event_line(event), flush=True)
    return EXIT_OK


# -- tool approvals -----------------------------------------------------------------------------

def cmd_approve(args: argparse.Namespace) -> int:
    """Answers a pending tool approval of a turn: allow (the default) or --deny."""
    if args.deny and (args.remember or args.input is not None):
        raise UsageError("--remember and --input go with allowing, not with --deny")
    updated_input = json_object_of(args.input, "--input", '{"command": "ls"}')
    approval = client_of(args).answer_approval(args.turn, args.request_id, "deny" if args.deny else "allow",
                                               updated_input=updated_input, message=args.message,
                                               remember=args.remember)
    if args.json:
        print_json(approval)
    else:
        print(f"{approval['request_id']} {approval['status']}")
    return EXIT_OK


def cmd_approvals(args: argparse.Namespace) -> int:
    """Lists a turn's tool approvals, pending and answered (or as JSON with --json)."""
    approvals = client_of(args).approvals(args.turn)
    if args.json:
        print_json(approvals)
        return EXIT_OK
    for a in approvals:
        print(f"{a['request_id']}  {a['status']:<9} {a['tool_name']}  "
              f"{json.dumps(a.get('input'), ensure_ascii=False)[:100]}  by={a.get('decided_by') or '-'}")
    return EXIT_OK


# -- workspace files ----------------------------------------------------------------------------

def cmd_files_get(args: argparse.Namespace) -> int:
    """Writes one workspace file to -o LOCAL, or to stdout."""
    client = client_of(args)
    if args.output in (None, "-"):
        client.download_file(args.session, args.remote, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return EXIT_OK
    written = local_io(lambda: client.download_file(args.session, args.remote, args.output))
    say(f"{args.remote} -> {args.output} ({written} bytes)")
    return EXIT_OK


def cmd_files_put(args: argparse.Namespace) -> int:
    """Uploads the local file LOCAL (or stdin for '-') to REMOTE in the workspace."""
    client = client_of(args)
    source = sys.stdin.buffer if args.local == "-" else args.local
    reply = local_io(lambda: client.put_file(args.session, args.remote, source))
    print(f"{reply['path']}  {reply['bytes']} bytes")
    return EXIT_OK


def cmd_files_download(args: argparse.Namespace) -> int:
    """Writes the whole workspace as tar.gz to -o (default workspace-SESSION.tar.gz)."""
    out = args.output or f"workspace-{args.session}.tar.gz"
    written = local_io(lambda: client_of(args).download_workspace(args.session, out))
    say(f"workspace -> {out} ({written} bytes)")
    return EXIT_OK


def cmd_files_upload(args: argparse.Namespace) -> int:
    """Unpacks a local tar or tar.gz into the workspace."""
    reply = local_io(lambda: client_of(args).upload_workspace(args.session, args.archive))
    print(f"{reply['files']} files, {reply['bytes']} bytes")
    return EXIT_OK


def local_io(action: Callable[[], T]) -> T:
    """Runs `action`; a local file that cannot be read or written is a usage error (exit 2)."""
    try:
        return action()
    except OSError as exc:
        raise UsageError(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)) from None


# -- batches ------------------------------------------------------------------------------------

def cmd_batch_run(args: argparse.Namespace) -> int:
    """Submits the prompts not yet in --out as one batch and appends each result as it finishes."""
    if args.session and args.model:
        raise UsageError("give --session or --model, not both")
    items = read_prompts(Path(args.prompts), args.session, args.model)
    client, out = client_of(args), Path(args.out)
    results = ResultsFile(out)
    try:
        reattach(client, out, results)
        pending = [i for i in items if i["custom_id"] not in results.done]
        if pending:
            run_batch(client, pending, args.concurrency, out, results)
        else:
            say(f"nothing to submit: all {len(items)} items are in {out}")
    finally:
        results.close()
    failed = [i["custom_id"] for i in items if results.done.get(i["custom_id"], {}).get("status") != "succeeded"]
    if failed:
        say(f"{len(failed)} of {len(items)} items did not succeed: {', '.join(failed[:10])}"
            + (" ..." if len(failed) > 10 else ""))
    return EXIT_FAILED if failed else EXIT_OK


def cmd_batch_status(args: argparse.Namespace) -> int:
    """Prints a batch's status and counts (or the batch as JSON with --json)."""
    batch = client_of(args).batch(args.id)
    if args.json:
        print_json(batch)
    else:
        counts = " ".join(f"{k}={v}" for k, v in batch["counts"].items() if v)
        print(f"{batch['id']}  {batch['status']}  {batch['progress'] * 100:.0f}% of {batch['total']}  {counts}")
    return EXIT_OK


def cmd_batch_cancel(args: argparse.Namespace) -> int:
    """Cancels the unfinished items of a batch."""
    batch = client_of(args).cancel_batch(args.id)
    print(f"{batch['id']} {batch['status']}")
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------------

def connection_flags() -> argparse.ArgumentParser:
    """--url and --token, accepted before or after the subcommand."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--url", default=argparse.SUPPRESS, help="API base URL (env CCD_URL)")
    flags.add_argument("--token", default=argparse.SUPPRESS, help="API token (env CCD_TOKEN)")
    return flags


def add_command(sub, name: str, func, help_text: str, parents: Iterable = ()) -> argparse.ArgumentParser:
    """Adds a subcommand that runs `func`."""
    parser = sub.add_parser(name, help=help_text, description=help_text, parents=list(parents))
    parser.set_defaults(func=func)
    return parser


def add_session_commands(sub, common: list) -> None:
    sessions = sub.add_parser("sessions", help="create, list, show, spawn, stop and remove sessions")
    ssub = sessions.add_subparsers(dest="action", required=True)
    create = add_command(ssub, "create", cmd_sessions_create, "create a session", common)
    create.add_argument("--model", help="the model the session uses")
    create.add_argument("--workspace", metavar="NAME",
                        help="a persistent workspace: saved when the session stops, restored by the next one")
    create.add_argument("--json", action="store_true", help="print the whole session as JSON")
    spawn = add_command(ssub, "spawn", cmd_sessions_spawn, "spawn a child session, optionally with a "
                        "first prompt", common)
    spawn.add_argument("id", help="the parent session's id")
    spawn.add_argument("--prompt", help="the child's first prompt ('-' reads it from stdin)")
    spawn.add_argument("--config", metavar="JSON", help="config keys that replace the parent's, as a JSON object")
    spawn.add_argument("--workspace", metavar="NAME", help="give the child this persistent workspace")
    spawn.add_argument("--json", action="store_true", help="print the child (and its first turn) as JSON")
    tree = add_command(ssub, "tree", cmd_sessions_tree, "show a session and every session below it", common)
    tree.add_argument("id", help="session id")
    tree.add_argument("--json", action="store_true", help="print the tree as nested JSON")
    listing = add_command(ssub, "list", cmd_sessions_list, "list your sessions", common)
    listing.add_argument("--status", help="only sessions in this status")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--offset", type=int, default=0)
    listing.add_argument("--json", action="store_true", help="print the page as JSON")
    for name, func, text in (("show", cmd_sessions_show, "show a session as JSON"),
                             ("stop", cmd_sessions_stop, "stop a session's container"),
                             ("rm", cmd_sessions_rm, "delete a session, its container and workspace")):
        add_command(ssub, name, func, text, common).add_argument("id", help="session id")


def add_approval_commands(sub, common: list) -> None:
    approve = add_command(sub, "approve", cmd_approve, "answer a tool approval a turn waits for (allow, or "
                          "--deny)", common)
    approve.add_argument("turn", help="turn id")
    approve.add_argument("request_id", help="the approval's request id (from approval.requested or "
                         "`ccd approvals TURN`)")
    approve.add_argument("--deny", action="store_true", help="deny the tool use instead of allowing it")
    approve.add_argument("--message", metavar="M", help="what the model is told (with --deny)")
    approve.add_argument("--remember", action="store_true",
                         help="also allow such tool uses for the rest of the session without asking")
    approve.add_argument("--input", metavar="JSON", help="run the tool with this input instead (a JSON object)")
    approve.add_argument("--json", action="store_true", help="print the answered approval as JSON")
    approvals = add_command(sub, "approvals", cmd_approvals, "list a turn's tool approvals", common)
    approvals.add_argument("turn", help="turn id")
    approvals.add_argument("--json", action="store_true", help="print them as JSON")


def add_file_commands(sub, common: list) -> None:
    files = sub.add_parser("files", help="read and write a session's workspace")
    fsub = files.add_subparsers(dest="action", required=True)
    get = add_command(fsub, "get", cmd_files_get, "download one workspace file", common)
    get.add_argument("session", help="session id")
    get.add_argument("remote", help="the file's path, relative to /workspace")
    get.add_argument("-o", "--output", metavar="LOCAL", help="write it here (default: stdout)")
    put = add_command(fsub, "put", cmd_files_put, "upload one file into the workspace", common)
    put.add_argument("session", help="session id")
    put.add_argument("remote", help="the file's path, relative to /workspace (directories are made)")
    put.add_argument("local", help="the local file ('-' reads stdin)")
    download = add_command(fsub, "download", cmd_files_download, "download the whole workspace as tar.gz", common)
    download.add_argument("session", help="session id")
    download.add_argument("-o", "--output", metavar="ARCHIVE", help="default workspace-SESSION.tar.gz")
    upload = add_command(fsub, "upload", cmd_files_upload, "unpack a tar or tar.gz into the workspace", common)
    upload.add_argument("session", help="session id")
    upload.add_argument("archive", help="a local .tar or .tar.gz holding only files and directories")


def add_batch_commands(sub, common: list) -> None:
    batch = sub.add_parser("batch", help="run many prompts as a batch")
    bsub = batch.add_subparsers(dest="action", required=True)
    run = add_command(bsub, "run", cmd_batch_run, "submit the prompts of a JSONL file not yet in --out, "
                      "and append each result to --out as it finishes (re-run to resume)", common)
    run.add_argument("prompts", help='JSONL, one {"prompt", "custom_id"?, "session_id"?, "config"?} per line')
    run.add_argument("--out", required=True, help="results JSONL, appended to")
    run.add_argument("--concurrency", type=int, default=4, help="turns running at once (default 4)")
    run.add_argument("--session", help="run items without session_id/config in this session")
    run.add_argument("--model", help="model of the new session made for each item without a target")
    status = add_command(bsub, "status", cmd_batch_status, "show a batch's progress", common)
    status.add_argument("id", help="batch id")
    status.add_argument("--json", action="store_true", help="print the batch as JSON")
    add_command(bsub, "cancel", cmd_batch_cancel, "cancel a batch's unfinished items", common).add_argument("id")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccd", description="cc-docker command line", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("CCD_URL") or DEFAULT_URL,
                        help="API base URL (env CCD_URL, default %(default)s)")
    parser.add_argument("--token", default=os.environ.get("CCD_TOKEN"), help="API token (env CCD_TOKEN)")
    sub = parser.add_subparsers(dest="command", required=True)
    common = [connection_flags()]
    token = sub.add_parser("token", help="mint an API token from JWT_SECRET (or: token revoke)")
    token.add_argument("--sub", default=os.environ.get("USER") or "dev", help="the token's owner")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    token.set_defaults(func=cmd_token)
    tsub = token.add_subparsers(dest="action")
    revoke = add_command(tsub, "revoke", cmd_token_revoke, "revoke the token in use (--token or CCD_TOKEN), "
                         "or one of your token ids with --jti and --exp", common)
    revoke.add_argument("--jti", help="a token id (the jti claim) of yours")
    revoke.add_argument("--exp", type=int, help="with --jti: when that token expires (Unix seconds)")
    add_session_commands(sub, common)
    chat = add_command(sub, "chat", cmd_chat, "send a prompt to a session and stream the answer", common)
    chat.add_argument("session", help="session id")
    chat.add_argument("prompt", help="the prompt ('-' reads it from stdin)")
    chat.add_argument("--json", action="store_true", help="print the raw events, one JSON per line")
    tail = add_command(sub, "tail", cmd_tail, "follow a session's events live", common)
    tail.add_argument("session", help="session id")
    tail.add_argument("--since", help="start after this event id")
    tail.add_argument("--json", action="store_true", help="print the raw events, one JSON per line")
    add_approval_commands(sub, common)
    add_file_commands(sub, common)
    add_batch_commands(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        say(f"error: {exc}")
        return EXIT_USAGE
    except ApiError as exc:
        say(f"error: {exc}")
        return exit_code_of(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (e.g. `| head`): nothing left to say
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
