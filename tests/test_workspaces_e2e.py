"""Persistent workspaces, workspace files and idle sessions, end to end with every real part
(the S3 server is moto on loopback)."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
import uuid

import pytest
import requests
from sqlalchemy import create_engine, select, update

from core.models import Workspace
from core.storage import storage_from_settings
from core.workspaces import snapshot_key
from tests.conftest import wait_for
from tests.model_server import message_text
from tests.test_e2e import Api, container_of

pytestmark = pytest.mark.docker
OWNER = "ws-owner"


@pytest.fixture(scope="module")
def api(stack_env, token):
    return Api(stack_env["base"], token(OWNER))


def new_session(api: Api, workspace: dict | None = None, **config) -> dict:
    body = {"workspace": workspace or {"type": "ephemeral"}, "config": config}
    return api.call("POST", "/api/v1/sessions", 201, json=body)


def run(api: Api, sid: str, prompt: str) -> dict:
    turn = api.finished_turn(api.chat(sid, prompt)["id"], timeout=120)
    assert turn["status"] == "succeeded", turn
    return turn


def stop(api: Api, sid: str, timeout: float = 60) -> dict:
    api.call("POST", f"/api/v1/sessions/{sid}/stop", 202)
    return api.session_status(sid, "stopped", timeout=timeout)


def workspace_row(settings, name: str):
    engine = create_engine(settings.database_url)
    with engine.connect() as conn:
        row = conn.execute(select(Workspace).where(Workspace.owner == OWNER, Workspace.name == name)).one()
    engine.dispose()
    return row


def prompts_seen(model, since: int) -> list[str]:
    """Every user message text in the agent's model requests after the first `since` of them."""
    return [message_text(m) for body in model.tool_requests()[since:] for m in body["messages"]
            if m["role"] == "user"]


def test_a_persistent_workspace_survives_stop_and_is_restored_with_its_conversation(stack_env, api, docker_client):
    settings, model = stack_env["settings"], stack_env["model"]
    name = f"proj-{uuid.uuid4().hex[:6]}"
    first = new_session(api, {"type": "persistent", "name": name})
    marker = uuid.uuid4().hex
    run(api, first["id"], f"RUN: echo {marker} > /workspace/notes.txt && cat /workspace/notes.txt")
    stop(api, first["id"])

    saved = workspace_row(settings, name)
    assert saved.generation == 1 and saved.holder_id is None
    assert saved.snapshot_key == snapshot_key(OWNER, name)
    with storage_from_settings(settings).open(saved.snapshot_key) as source:
        data = source.read()
    assert len(data) == saved.size_bytes and hashlib.sha256(data).hexdigest() == saved.sha256
    names = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz").getnames()
    assert "workspace/notes.txt" in names and any(n.startswith("home/agent/.claude/") for n in names)

    second = new_session(api, {"type": "persistent", "name": name})
    api.session_status(second["id"], "ready", timeout=90)
    assert container_of(docker_client, settings, second["id"]).id != first["container_id"]
    # While the new session runs, nobody else may take the workspace: not a third session, not the old one.
    third = requests.post(stack_env["base"] + "/api/v1/sessions", headers=api.headers, timeout=30,
                          json={"workspace": {"type": "persistent", "name": name}})
    assert third.status_code == 409 and third.json()["error"]["code"] == "workspace_in_use"
    again = requests.post(f"{stack_env['base']}/api/v1/sessions/{first['id']}/chat", headers=api.headers,
                          json={"prompt": "SAY: me too"}, timeout=30)
    assert again.status_code == 409 and again.json()["error"]["code"] == "workspace_in_use"

    seen_before = len(model.tool_requests())
    turn = run(api, second["id"], "RUN: cat /workspace/notes.txt")
    assert marker in turn["result"]
    # The restored session resumed the old conversation: the model was sent the first prompt again.
    assert any(f"echo {marker}" in text for text in prompts_seen(model, seen_before))


def test_a_stopped_session_whose_host_lost_its_volumes_restores_from_the_snapshot(stack_env, api, docker_client):
    settings = stack_env["settings"]
    sid = new_session(api, {"type": "persistent", "name": f"lost-{uuid.uuid4().hex[:6]}"})["id"]
    marker = uuid.uuid4().hex
    run(api, sid, f"RUN: echo {marker} > /workspace/kept.txt")
    api.call("POST", f"/api/v1/sessions/{sid}/stop", 202)
    api.session_status(sid, "stopped")
    # As if the session came back on a new host: no container, no volumes.
    container_of(docker_client, settings, sid).remove(force=True)
    for volume in docker_client.volumes.list(filters={"label": f"ccd.session={sid}"}):
        volume.remove(force=True)
    turn = run(api, sid, "RUN: cat /workspace/kept.txt")
    assert marker in turn["result"]


def test_workspace_files_download_upload_and_stay_inside_the_workspace(stack_env, api):
    base, headers = stack_env["base"] + "/api/v1/sessions", api.headers
    sid = new_session(api)["id"]
    api.session_status(sid, "ready", timeout=90)
    files = f"{base}/{sid}/workspace/files"

    put = requests.put(f"{files}/dir/hello.txt", data=b"hi there", headers=headers, timeout=60)
    assert put.status_code == 200 and put.json() == {"path": "dir/hello.txt", "bytes": 8}
    got = requests.get(f"{files}/dir/hello.txt", headers=headers, timeout=60)
    assert got.status_code == 200 and got.content == b"hi there"

    upload = io.BytesIO()
    with tarfile.open(fileobj=upload, mode="w:gz") as archive:
        payload = uuid.uuid4().bytes * 1000
        info = tarfile.TarInfo("src/data.bin")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    posted = requests.post(f"{base}/{sid}/workspace", data=upload.getvalue(), headers=headers, timeout=60)
    assert posted.status_code == 200 and posted.json() == {"files": 1, "bytes": len(payload)}
    # The agent sees uploaded files where it works.
    turn = run(api, sid, "RUN: sha256sum src/data.bin && cat dir/hello.txt && ln -s /etc /workspace/etc "
                         "&& ln -s /etc/hostname /workspace/host && mkfifo /workspace/pipe")
    assert hashlib.sha256(payload).hexdigest() in turn["result"] and "hi there" in turn["result"]

    whole = requests.get(f"{base}/{sid}/workspace", headers=headers, timeout=60)
    assert whole.status_code == 200 and whole.headers["Content-Type"] == "application/gzip"
    members = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(whole.content), mode="r:gz")}
    assert {"./dir/hello.txt", "./src/data.bin"} <= set(members)
    assert members["./etc"].issym()  # a symlink is archived as a link, never followed

    for method, path, code in (("GET", "etc/passwd", "invalid_path"), ("GET", "host", "invalid_path"),
                               ("PUT", "etc/evil", "invalid_path"), ("GET", "missing.txt", "file_not_found"),
                               ("GET", "dir", "not_a_file"), ("GET", "pipe", "not_a_file")):
        resp = requests.request(method, f"{files}/{path}", data=b"x" if method == "PUT" else None,
                                headers=headers, timeout=60)
        assert resp.status_code in (404, 422) and resp.json()["error"]["code"] == code, (method, path, resp.text)

    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as archive:
        link = tarfile.TarInfo("escape")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        archive.addfile(link)
    resp = requests.post(f"{base}/{sid}/workspace", data=evil.getvalue(), headers=headers, timeout=60)
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_archive"

    # A stopped session's files are still reachable: the request starts it again.
    api.call("POST", f"/api/v1/sessions/{sid}/stop", 202)
    api.session_status(sid, "stopped")
    got = requests.get(f"{files}/dir/hello.txt", headers=headers, timeout=90)
    assert got.status_code == 200 and got.content == b"hi there"
    assert api.call("GET", f"/api/v1/sessions/{sid}", 200)["status"] == "ready"


def test_an_idle_session_is_stopped_and_the_next_chat_resumes_it(stack_env, api):
    model = stack_env["model"]
    sid = new_session(api, timeouts={"idle_seconds": 3})["id"]
    marker = uuid.uuid4().hex
    run(api, sid, f"SAY: remember {marker}")
    api.session_status(sid, "stopped", timeout=60)
    events = api.call("GET", f"/api/v1/sessions/{sid}/events?limit=1000", 200)["items"]
    assert any(e["type"] == "session.status" and e["data"].get("reason") == "idle" for e in events)

    seen_before = len(model.tool_requests())
    turn = run(api, sid, "SAY: back again")
    assert turn["result"] == "back again"
    assert any(f"remember {marker}" in text for text in prompts_seen(model, seen_before))
    later = api.call("GET", f"/api/v1/sessions/{sid}/events?since={events[-1]['id']}&limit=1000", 200)["items"]
    starting = [e for e in later if e["type"] == "session.status" and e["data"]["status"] == "starting"]
    assert starting and starting[0]["data"]["reason"]
    wait_for(lambda: api.call("GET", f"/api/v1/sessions/{sid}", 200)["status"] in ("ready", "stopped"),
             what="the session to settle")


def tree_io(pid: int) -> dict[str, int]:
    """Bytes read and written (rchar, wchar: sockets and files alike) by a process and its children so far."""
    totals, pending = {"rchar": 0, "wchar": 0}, [pid]
    while pending:
        current = pending.pop()
        try:
            for line in open(f"/proc/{current}/io").read().splitlines():
                key, _, value = line.partition(": ")
                if key in totals:
                    totals[key] += int(value)
            for task in os.listdir(f"/proc/{current}/task"):
                pending += [int(c) for c in open(f"/proc/{current}/task/{task}/children").read().split()]
        except FileNotFoundError:  # it ended meanwhile
            continue
    return totals


def test_a_sparse_terabyte_is_not_saved_the_old_snapshot_stays_and_the_stop_completes(stack_env, api):
    """`truncate -s 1T` uses no disk (the disk watcher sees nothing), but a snapshot would read, gzip and later
    restore the whole terabyte: the save is refused on the file's header, within the session's disk limit."""
    settings, worker = stack_env["settings"], stack_env["worker"]
    name, disk_mb, marker = f"sparse-{uuid.uuid4().hex[:6]}", 64, uuid.uuid4().hex
    first = new_session(api, {"type": "persistent", "name": name}, limits={"disk_mb": disk_mb})
    run(api, first["id"], f"RUN: echo {marker} > /workspace/notes.txt")
    stop(api, first["id"])
    before = workspace_row(settings, name)
    assert before.generation == 1

    second = new_session(api, {"type": "persistent", "name": name}, limits={"disk_mb": disk_mb})
    run(api, second["id"], "RUN: truncate -s 1T /workspace/bomb && echo changed > /workspace/notes.txt && du -sh /workspace")
    io_before, started = tree_io(worker.proc.pid), time.monotonic()
    stopped = stop(api, second["id"], timeout=120)
    took, io_after = time.monotonic() - started, tree_io(worker.proc.pid)
    assert took < 60, f"the refused save took {took:.0f} s"
    cap = disk_mb << 20
    # The worker read (from the engine) and wrote (to its spool) at most the cap, not the terabyte.
    assert io_after["rchar"] - io_before["rchar"] < cap + (32 << 20), (io_before, io_after)
    assert io_after["wchar"] - io_before["wchar"] < cap + (32 << 20), (io_before, io_after)
    assert "more than the session's disk limit" in stopped["error"] and "not saved" in stopped["error"], stopped
    events = api.call("GET", f"/api/v1/sessions/{second['id']}/events?limit=1000", 200)["items"]
    final = [e for e in events if e["type"] == "session.status" and e["data"]["status"] == "stopped"]
    assert final and final[-1]["data"]["reason"] == "snapshot_too_large", final
    after = workspace_row(settings, name)
    assert (after.generation, after.sha256, after.holder_id) == (1, before.sha256, None)
    with storage_from_settings(settings).open(after.snapshot_key) as source:
        assert hashlib.sha256(source.read()).hexdigest() == before.sha256

    # The next session of the workspace gets the old snapshot, without the bomb.
    third = new_session(api, {"type": "persistent", "name": name}, limits={"disk_mb": disk_mb})
    turn = run(api, third["id"], "RUN: cat /workspace/notes.txt; ls /workspace")
    assert marker in turn["result"] and "bomb" not in turn["result"] and "changed" not in turn["result"], turn
    stop(api, third["id"])


def old_snapshot(settings, name: str, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    """Puts an archive as the workspace's newest snapshot, as one saved before snapshots were checked might be: the
    saved agent home (its conversation) and `members`."""
    data, storage = io.BytesIO(), storage_from_settings(settings)
    with storage.open(snapshot_key(OWNER, name)) as source:
        saved = tarfile.open(fileobj=io.BytesIO(source.read()), mode="r:gz")
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        for member in saved:
            if member.name.startswith("home/"):
                tar.addfile(member, saved.extractfile(member) if member.isfile() else None)
        for member, content in members:
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content) if content else None)
    data.seek(0)
    stored = storage.put(snapshot_key(OWNER, name), data)
    engine = create_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(update(Workspace).where(Workspace.owner == OWNER, Workspace.name == name).values(
            sha256=stored.sha256, size_bytes=stored.size, generation=Workspace.generation + 1))
    engine.dispose()


def entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.linkname, member.mode = kind, linkname, 0o755 if kind == tarfile.DIRTYPE else 0o644
    return member


def test_a_restore_leaves_out_fifos_devices_and_outside_links_and_refuses_a_snapshot_past_the_disk_limit(
        stack_env, api):
    settings, name, marker = stack_env["settings"], f"old-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    first = new_session(api, {"type": "persistent", "name": name}, limits={"disk_mb": 16})
    run(api, first["id"], "RUN: echo saved > /workspace/notes.txt")
    stop(api, first["id"])
    old_snapshot(settings, name, [
        (entry("workspace", tarfile.DIRTYPE), b""), (entry("workspace/notes.txt"), marker.encode()),
        (entry("workspace/pipe", tarfile.FIFOTYPE), b""), (entry("workspace/tty", tarfile.CHRTYPE), b""),
        (entry("workspace/passwd", tarfile.LNKTYPE, "etc/passwd"), b""),
        (entry("workspace/same", tarfile.LNKTYPE, "workspace/notes.txt"), b""),
        (entry("workspace/up", tarfile.SYMTYPE, "../etc"), b""), (entry("etc/ccd-restored"), b"x")])
    second = new_session(api, {"type": "persistent", "name": name}, limits={"disk_mb": 16})
    turn = run(api, second["id"], "RUN: ls -A /workspace; readlink /workspace/up; cat /workspace/same; "
                                  "test -e /etc/ccd-restored || echo absent")
    listing = turn["result"]
    assert "notes.txt\nsame\nup\n../etc\n" in listing and marker in listing, listing  # the rest is left out
    assert "absent" in listing, listing
    stop(api, second["id"])

    # 17 MiB of zeros is 17 KiB of gzip: restoring it would pass the new session's 16 MB disk limit.
    old_snapshot(settings, name, [(entry("workspace/zeros"), bytes(17 << 20))])
    third = new_session(api, {"type": "persistent", "name": name}, limits={"disk_mb": 16})
    failed = api.session_status(third["id"], "failed", timeout=90)
    assert "more than the session's disk limit" in failed["error"] and "not restored" in failed["error"], failed
    def failed_events():  # published once the container is stopped, after the row says failed
        events = api.call("GET", f"/api/v1/sessions/{third['id']}/events?limit=1000", 200)["items"]
        return [e["data"].get("reason") for e in events if e["data"].get("status") == "failed"]
    assert wait_for(failed_events, 30, what="the failed status event") == ["snapshot_too_large"]
