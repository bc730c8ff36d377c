"""The Python client (client.api) and the `ccd` command line against the real stack."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import uuid
from pathlib import Path

import pytest
import redis

from client.api import (Client, Conflict, ConnectionFailed, NotFound, Unauthorized, ValidationError,
                        batch_body, new_idempotency_key)
from client.follow import split_lines, sse_events
from client.batch_run import idempotency_key_of, read_prompts
from tests.conftest import wait_for

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parent.parent
FINAL = {"turn.completed", "turn.failed", "turn.cancelled"}


def client_for(stack_env, token, owner: str) -> Client:
    return Client(stack_env["base"], token(owner), timeout=60)


def ccd(stack_env, token, owner: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs the `ccd` command line as a user would, configured through the environment."""
    env = {**os.environ, "CCD_URL": stack_env["base"], "CCD_TOKEN": token(owner)}
    return subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def stored_ids(settings, sid: str) -> list[str]:
    entries = redis.Redis.from_url(settings.redis_url, decode_responses=True).xrange(
        f"{settings.key_prefix}:events:{sid}")
    return [entry_id for entry_id, _ in entries]


def test_sse_parsing_joins_data_lines_and_reports_heartbeats():
    raw = [b"retry: 2000\n\n: keep-alive\n\nid: 1-0\nevent: x\ndata: {\"id\": \"1-0\",", b"\ndata: \"a\": 1}\n\nid: 2"]
    assert list(sse_events(split_lines(iter(raw)))) == [None, None, {"id": "1-0", "a": 1}]


def test_chat_wait_stream_and_typed_errors(stack_env, token):
    api = client_for(stack_env, token, "client-api")
    sid = api.create_session()["id"]

    turn = api.chat(sid, "SAY: hello from the client", wait=120)
    assert turn["status"] == "succeeded" and turn["result"] == "hello from the client", turn
    assert api.wait_turn(turn["id"], timeout=5)["id"] == turn["id"]

    events = list(api.chat_stream(sid, "SAY: streamed answer"))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "turn.queued" and kinds[-1] == "turn.completed", kinds
    assert events[-1]["data"]["result"] == "streamed answer"
    assert len({e["turn_id"] for e in events}) == 1 and "claude.stream_event" in kinds
    # The final event is published just before the row is updated: the row catches up at once.
    assert api.wait_turn(events[-1]["turn_id"], timeout=10)["status"] == "succeeded"
    replayed = list(api.turn_events(sid, events[-1]["turn_id"]))  # how a broken stream resumes
    assert [e["id"] for e in replayed] == [e["id"] for e in events]

    with pytest.raises(NotFound) as missing:
        api.session(str(uuid.uuid4()))
    assert missing.value.status == 404 and missing.value.code == "not_found"
    with pytest.raises(ValidationError) as blank:
        api.chat(sid, "   ")
    assert blank.value.status == 400 and blank.value.field == "prompt"
    with pytest.raises(Conflict) as finished:
        api.cancel(turn["id"])
    assert finished.value.code == "turn_finished"
    with pytest.raises(Unauthorized):
        Client(stack_env["base"], "not-a-token").list_sessions()
    with pytest.raises(ConnectionFailed):
        Client("http://127.0.0.1:1", "x").list_sessions()
    assert sid in [s["id"] for s in api.list_sessions()["items"]]
    assert api.delete_session(sid)["status"] in ("stopping", "deleted")


def test_events_follower_resumes_after_a_dropped_connection_without_loss_or_duplicates(stack_env, token):
    api = client_for(stack_env, token, "client-events")
    sid = api.create_session()["id"]
    seen, dropped_at = [], None
    with api.events(sid) as follower:
        turn = api.chat(sid, "SLOW: 4")
        for event in follower:
            seen.append(event)
            if dropped_at is None and event["turn_id"] == turn["id"] and event["type"] == "claude.stream_event":
                dropped_at = len(seen)
                follower.drop()  # the network fails mid-turn
            if event["turn_id"] == turn["id"] and event["type"] in FINAL:
                break
        assert follower.connects == 2
    assert dropped_at is not None and seen[-1]["type"] == "turn.completed"
    after = [e["type"] for e in seen[dropped_at:]]
    assert "claude.stream_event" in after, "the drop should land while the turn still streams"
    ids = [e["id"] for e in seen]
    stored = [i for i in stored_ids(stack_env["settings"], sid) if api_key(i) <= api_key(ids[-1])]
    assert ids == stored


def api_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


def write_prompts(path: Path, numbers: range) -> None:
    with path.open("a") as f:
        for n in numbers:
            f.write(json.dumps({"prompt": f"SAY: item-{n}"}) + "\n")


def results_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_run_writes_results_and_a_rerun_submits_only_new_items(stack_env, token, tmp_path):
    api = client_for(stack_env, token, "client-batch")
    sid = api.create_session()["id"]
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    write_prompts(prompts, range(1, 7))

    first = ccd(stack_env, token, "client-batch", "batch", "run", str(prompts), "--concurrency", "2",
                "--out", str(out), "--session", sid)
    assert first.returncode == 0, first.stderr
    results = results_of(out)
    assert sorted(r["custom_id"] for r in results) == [str(n) for n in range(1, 7)]
    assert all(r["status"] == "succeeded" and r["result"] == f"item-{r['custom_id']}" for r in results), results
    assert all(r["session_id"] == sid for r in results)

    # A run that crashed right after submitting items 7 and 8: the re-run finds that same batch.
    write_prompts(prompts, range(7, 9))
    pending = [i for i in read_prompts(prompts, sid, None) if i["custom_id"] in ("7", "8")]
    crashed = api.create_batch(pending, 2, idempotency_key=idempotency_key_of(batch_body(pending, 2)))
    second = ccd(stack_env, token, "client-batch", "batch", "run", str(prompts), "--concurrency", "2",
                 "--out", str(out), "--session", sid)
    assert second.returncode == 0, second.stderr
    assert f"batch {crashed['id']}: 2 items" in second.stderr
    results = results_of(out)
    assert sorted(r["custom_id"] for r in results) == sorted(str(n) for n in range(1, 9))
    assert {r["custom_id"]: r["result"] for r in results} == {str(n): f"item-{n}" for n in range(1, 9)}
    assert api.batch(crashed["id"])["total"] == 2 and api.batch(crashed["id"])["status"] == "completed"

    third = ccd(stack_env, token, "client-batch", "batch", "run", str(prompts), "--concurrency", "2",
                "--out", str(out), "--session", sid)
    assert third.returncode == 0 and "nothing to submit" in third.stderr
    assert len(results_of(out)) == 8
    status = ccd(stack_env, token, "client-batch", "batch", "status", crashed["id"])
    assert status.returncode == 0 and "completed" in status.stdout


def test_ccd_sessions_chat_and_exit_codes(stack_env, token):
    owner = "client-cli"
    created = ccd(stack_env, token, owner, "sessions", "create", "--json")
    assert created.returncode == 0, created.stderr
    sid = json.loads(created.stdout)["id"]

    chat = ccd(stack_env, token, owner, "chat", sid, "SAY: printed by ccd chat")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip() == "printed by ccd chat" and "[succeeded" in chat.stderr
    raw = ccd(stack_env, token, owner, "chat", sid, "SAY: raw events", "--json")
    kinds = [json.loads(line)["type"] for line in raw.stdout.splitlines()]
    assert raw.returncode == 0 and kinds[0] == "turn.queued" and kinds[-1] == "turn.completed"

    failed = ccd(stack_env, token, owner, "chat", sid, "FAIL: 500")
    assert failed.returncode == 1 and "[failed" in failed.stderr, failed.stderr

    listed = ccd(stack_env, token, owner, "sessions", "list")
    assert listed.returncode == 0 and sid in listed.stdout
    shown = ccd(stack_env, token, owner, "sessions", "show", sid)
    assert shown.returncode == 0 and json.loads(shown.stdout)["turn_count"] == 3

    assert ccd(stack_env, token, owner, "chat", str(uuid.uuid4()), "SAY: nobody").returncode == 4
    assert ccd(stack_env, token, owner, "sessions", "show", str(uuid.uuid4())).returncode == 4
    assert ccd(stack_env, token, owner, "chat", sid, "  ").returncode == 2
    assert ccd(stack_env, token, owner, "--url", "http://127.0.0.1:1", "sessions", "list").returncode == 3
    assert ccd(stack_env, token, owner, "sessions", "rm", sid).returncode == 0


def test_ccd_tail_prints_one_line_per_event(stack_env, token):
    owner = "client-tail"
    api = client_for(stack_env, token, owner)
    sid = api.create_session()["id"]
    turn = api.chat(sid, "SAY: tailed", wait=120)
    assert turn["status"] == "succeeded", turn
    env = {**os.environ, "CCD_URL": stack_env["base"], "CCD_TOKEN": token(owner)}
    tail = subprocess.Popen([sys.executable, "-m", "client.cli", "tail", sid], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(90, tail.kill)
    watchdog.start()
    try:
        lines = []
        for line in tail.stdout:
            lines.append(line)
            if "turn.completed" in line:
                break
    finally:
        watchdog.cancel()
        tail.kill()
        tail.wait(10)
    assert [line.split()[0] for line in lines] == [i for i in stored_ids(stack_env["settings"], sid)][:len(lines)]
    assert any("turn.queued" in line for line in lines)


# -- spawn trees and workspace files: one persistent session for all of them (each costs a container) --

TREE_OWNER = "client-tree"


@pytest.fixture(scope="module")
def shared_session(stack_env, token):
    """A ready session made by `ccd sessions create --workspace`, shared by the tests below."""
    name = f"client-{uuid.uuid4().hex[:8]}"
    created = ccd(stack_env, token, TREE_OWNER, "sessions", "create", "--workspace", name, "--json")
    assert created.returncode == 0, created.stderr
    session = json.loads(created.stdout)
    api = client_for(stack_env, token, TREE_OWNER)
    wait_for(lambda: api.session(session["id"])["status"] == "ready", timeout=120,
             what=f"session {session['id']} to be ready")
    yield {**session, "workspace_name": name}
    api.delete_session(session["id"])


def tar_gz(path: Path, files: dict[str, bytes]) -> Path:
    """Writes a tar.gz holding `files` (name -> content) to `path`."""
    with tarfile.open(path, "w:gz") as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return path


def archived_files(path: Path) -> dict[str, bytes]:
    """The regular files of a tar.gz, by path without the leading './'."""
    with tarfile.open(path, "r:gz") as archive:
        return {m.name.removeprefix("./"): archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}


def test_ccd_sessions_create_with_workspace_makes_a_persistent_session(stack_env, token, shared_session):
    api = client_for(stack_env, token, TREE_OWNER)
    expected = {"type": "persistent", "name": shared_session["workspace_name"]}
    assert shared_session["workspace"] == expected and api.session(shared_session["id"])["workspace"] == expected


def test_spawn_with_a_prompt_shows_in_children_and_the_tree_and_wait_turn_holds_server_side(
        stack_env, token, shared_session):
    api = client_for(stack_env, token, TREE_OWNER)
    parent = shared_session["id"]
    key = new_idempotency_key()
    child = api.spawn(parent, "SLOW: 3", idempotency_key=key)
    assert child["parent_id"] == parent and child["depth"] == 1 and child["turn"]["status"] == "queued", child
    assert child["workspace"] == {"type": "ephemeral"}  # the parent's persistent workspace is not shared
    assert api.spawn(parent, "SLOW: 3", idempotency_key=key)["id"] == child["id"]  # a retry makes no second child

    assert api.turn(child["turn"]["id"])["status"] in ("queued", "running")
    urls: list[str] = []
    api.http.hooks["response"].append(lambda resp, **_: urls.append(resp.url))
    turn = api.wait_turn(child["turn"]["id"], timeout=150, interval=0.05)
    api.http.hooks["response"].clear()
    assert turn["status"] == "succeeded" and turn["result"].endswith("SLOW-DONE"), turn
    # The turn ran for seconds: polling every 0.05 s would have sent dozens of requests.
    assert 1 <= len(urls) <= 2 and "wait=" in urls[0], urls

    assert [c["id"] for c in api.children(parent)["items"]] == [child["id"]]
    tree = api.children(parent, recursive=True)
    assert [(n["id"], n["depth"], n["children"]) for n in tree["items"]] == [(child["id"], 1, [])]
    assert tree["items"][0]["latest_turn"]["status"] == "succeeded" and tree["tree_cost_usd"] > 0
    assert api.children(child["id"], recursive=True)["items"] == []

    shown = ccd(stack_env, token, TREE_OWNER, "sessions", "tree", parent)
    assert shown.returncode == 0, shown.stderr
    top, below = shown.stdout.splitlines()
    assert top.split()[0] == parent and "depth=0" in top.split()
    assert below.startswith(f"  {child['id']}  ") and below.split()[2:] == ["depth=1", "turn=succeeded"], below
    assert "cost of the whole spawn tree" in shown.stderr

    bad_config = ccd(stack_env, token, TREE_OWNER, "sessions", "spawn", parent, "--config", "{model")
    assert bad_config.returncode == 2 and "--config" in bad_config.stderr
    assert ccd(stack_env, token, TREE_OWNER, "sessions", "spawn", str(uuid.uuid4())).returncode == 4
    assert [c["id"] for c in api.children(parent)["items"]] == [child["id"]]  # neither made a session


def test_put_file_then_get_file_round_trips_bytes_and_local_files(stack_env, token, shared_session, tmp_path):
    api = client_for(stack_env, token, TREE_OWNER)
    sid = shared_session["id"]
    assert api.put_file(sid, "notes/hello.txt", b"hi there") == {"path": "notes/hello.txt", "bytes": 8}
    assert api.get_file(sid, "notes/hello.txt") == b"hi there"

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    remote = "data/big #1 100%.bin"  # characters that must be quoted in the URL
    assert api.put_file(sid, remote, big) == {"path": remote, "bytes": 3 << 20}
    back = tmp_path / "back.bin"
    assert api.download_file(sid, remote, back) == 3 << 20
    assert back.read_bytes() == big.read_bytes() and not (tmp_path / "back.bin.part").exists()

    with pytest.raises(NotFound) as missing:
        api.get_file(sid, "notes/missing.txt")
    assert missing.value.code == "file_not_found"
    with pytest.raises(ValidationError) as not_a_file:
        api.get_file(sid, "notes")
    assert not_a_file.value.code == "not_a_file"
    for outside in ("../etc/passwd", "notes/../../etc/passwd", "/etc/passwd"):
        with pytest.raises(ValidationError) as refused:
            api.get_file(sid, outside)
        assert refused.value.code == "invalid_path", outside


def test_upload_workspace_then_download_workspace_holds_the_uploaded_files(stack_env, token, shared_session,
                                                                            tmp_path):
    api = client_for(stack_env, token, TREE_OWNER)
    sid = shared_session["id"]
    files = {"project/src/main.py": b"print('hi')\n", "project/README.txt": uuid.uuid4().bytes * 1000}
    archive = tar_gz(tmp_path / "project.tar.gz", files)
    assert api.upload_workspace(sid, archive) == {"files": 2, "bytes": sum(len(c) for c in files.values())}

    out = tmp_path / "workspace.tar.gz"
    written = api.download_workspace(sid, out)
    assert written == out.stat().st_size > 0
    assert {name: archived_files(out)[name] for name in files} == files


def test_ccd_files_commands_put_get_download_and_upload(stack_env, token, shared_session, tmp_path):
    sid = shared_session["id"]
    local = tmp_path / "in.txt"
    local.write_bytes(b"written by ccd files put\n")
    put = ccd(stack_env, token, TREE_OWNER, "files", "put", sid, "cli/in.txt", str(local))
    assert put.returncode == 0 and put.stdout.split() == ["cli/in.txt", str(local.stat().st_size), "bytes"], put

    out = tmp_path / "out.txt"
    got = ccd(stack_env, token, TREE_OWNER, "files", "get", sid, "cli/in.txt", "-o", str(out))
    assert got.returncode == 0, got.stderr
    assert out.read_bytes() == local.read_bytes()
    printed = ccd(stack_env, token, TREE_OWNER, "files", "get", sid, "cli/in.txt")
    assert printed.returncode == 0 and printed.stdout == local.read_text()

    archive = tar_gz(tmp_path / "up.tar.gz", {"cli/up/a.txt": b"a", "cli/up/b.txt": b"bb"})
    uploaded = ccd(stack_env, token, TREE_OWNER, "files", "upload", sid, str(archive))
    assert uploaded.returncode == 0 and uploaded.stdout.strip() == "2 files, 3 bytes", uploaded
    whole = tmp_path / "workspace.tar.gz"
    downloaded = ccd(stack_env, token, TREE_OWNER, "files", "download", sid, "-o", str(whole))
    assert downloaded.returncode == 0, downloaded.stderr
    contents = archived_files(whole)
    assert contents["cli/in.txt"] == local.read_bytes() and contents["cli/up/b.txt"] == b"bb"

    assert ccd(stack_env, token, TREE_OWNER, "files", "get", sid, "cli/missing.txt").returncode == 4
    assert ccd(stack_env, token, TREE_OWNER, "files", "get", sid, "../etc/passwd").returncode == 2
    unwritable = ccd(stack_env, token, TREE_OWNER, "files", "get", sid, "cli/in.txt", "-o",
                     str(tmp_path / "no" / "such" / "dir.txt"))
    assert unwritable.returncode == 2 and "No such file or directory" in unwritable.stderr
    missing_local = ccd(stack_env, token, TREE_OWNER, "files", "put", sid, "cli/x.txt", str(tmp_path / "nope"))
    assert missing_local.returncode == 2 and "nope" in missing_local.stderr
