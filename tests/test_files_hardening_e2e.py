"""The workspace file API against a hostile agent and hostile archives, end to end: modules the agent plants never
run in the worker's helpers, archive bombs, links and devices are refused with nothing written, and what the worker
reads back from a helper is bounded.

A private stack (own database, key prefix and queues; the run's image, network and model server) with small caps,
so they are reached in a moment.
"""
from __future__ import annotations

import base64
import io
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import textwrap
import time
from dataclasses import replace

import pytest
import requests

from tests import stack
from tests.test_e2e import Api, container_of
from workers.runtime import DockerRuntime, OutputTooLarge

pytestmark = pytest.mark.docker
UNPACKED, MEMBERS, DOWNLOAD = 8 << 20, 200, 4 << 20
MARKS = "/workspace/.planted-ran"

# Run by the agent's Bash tool: plants modules that record that they ran (and a wrapper.files that lies) wherever
# a Python started in the workspace, or with site, would import them.
PLANTER = textwrap.dedent(f"""
    import os, sys
    def mark(name):
        return f"import os\\nos.makedirs({MARKS!r}, exist_ok=True)\\nopen(os.path.join({MARKS!r}, {{name!r}}), 'w').close()\\n"
    liar = mark("wrapper.files") + "import sys\\ndef main(argv):\\n    sys.stdout.write('LIE')\\n    return 0\\n"
    liar += "if __name__ == '__main__':\\n    sys.exit(main(sys.argv[1:]))\\n"
    user_site = os.path.expanduser(f"~/.local/lib/python{{sys.version_info[0]}}.{{sys.version_info[1]}}/site-packages")
    plants = {{"/workspace/wrapper/__init__.py": mark("wrapper"), "/workspace/wrapper/files.py": liar,
              "/workspace/wrapper/__main__.py": mark("wrapper.__main__"),
              "/workspace/sitecustomize.py": mark("sitecustomize"), "/workspace/usercustomize.py": mark("usercustomize"),
              "/workspace/json.py": mark("json"), "/workspace/tarfile.py": mark("tarfile"),
              "/workspace/gzip.py": mark("gzip"), "/workspace/shutil.py": mark("shutil"),
              user_site + "/sitecustomize.py": mark("user-sitecustomize"),
              user_site + "/usercustomize.py": mark("user-usercustomize"),
              user_site + "/ccd-planted.pth": mark("pth").replace("\\n", "; ").rstrip("; ") + "\\n"}}
    for path, text in plants.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    print("planted", len(plants))
""")


@pytest.fixture(scope="module")
def files_stack(stack_env, settings, docker_client, token):
    """web, worker and model proxy of a private stack with small archive and download caps."""
    env = stack.private_stack_env(stack_env["env"], settings, "f", CCD_MAX_UNPACKED_BYTES=str(UNPACKED),
                                  CCD_MAX_ARCHIVE_MEMBERS=str(MEMBERS), CCD_MAX_DOWNLOAD_BYTES=str(DOWNLOAD))
    database_url, prefix, port = env["DATABASE_URL"], env["CCD_KEY_PREFIX"], int(env["CCD_PORT"])
    proxy = stack.start_proxy(env, name="files-proxy")
    web = stack.start_web(env, port, name="files-web")
    worker = stack.start_worker(env, name="files-worker")
    yield {"api": Api(f"http://127.0.0.1:{port}", token("files-owner")),
           "settings": replace(settings, database_url=database_url, key_prefix=prefix)}
    worker.stop()
    web.stop()
    proxy.stop()
    stack.remove_private_stack(docker_client, prefix, database_url)


@pytest.fixture(scope="module")
def box(files_stack, docker_client):
    """One ready session of the private stack, shared by the archive checks: (api, session id, container)."""
    api = files_stack["api"]
    sid = api.session()["id"]
    api.session_status(sid, "ready", timeout=90)
    return api, sid, container_of(docker_client, files_stack["settings"], sid)


def run(api: Api, sid: str, command: str) -> dict:
    turn = api.finished_turn(api.chat(sid, f"RUN: {command}")["id"], timeout=120)
    assert turn["status"] == "succeeded", turn
    return turn


def listing(container) -> set[str]:
    """Every path under /workspace with its type and size, as the engine sees it (not through our helpers)."""
    code, out = container.exec_run(["find", "/workspace", "-mindepth", "1", "-printf", "%P %y %s\n"], user="agent")
    assert code == 0, out
    return set(out.decode().splitlines())


def upload(api: Api, sid: str, data: bytes) -> requests.Response:
    return requests.post(f"{api.base}/api/v1/sessions/{sid}/workspace", data=data, headers=api.headers, timeout=120)


def file_url(api: Api, sid: str, path: str) -> str:
    return f"{api.base}/api/v1/sessions/{sid}/workspace/files/{path}"


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None], mode: str = "w:gz") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def member(name: str, data: bytes | None = b"", kind: bytes = tarfile.REGTYPE, **attrs) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if data is not None and kind == tarfile.REGTYPE else 0
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data if kind == tarfile.REGTYPE else None


class Zeros(io.RawIOBase):
    """`size` zero bytes, made as they are read (a bomb's payload, never held whole)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def refused(resp: requests.Response, status: int, code: str) -> None:
    assert resp.status_code == status and resp.json()["error"]["code"] == code, (resp.status_code, resp.text)


def test_modules_the_agent_plants_never_run_and_the_owners_put_get_and_archive_stay_true(files_stack,
                                                                                        docker_client):
    api = files_stack["api"]
    sid = api.session()["id"]
    api.session_status(sid, "ready", timeout=90)
    container = container_of(docker_client, files_stack["settings"], sid)
    script = base64.b64encode(PLANTER.encode()).decode()
    assert "planted 12" in run(api, sid, f"echo {script} | base64 -d | python3 -")["result"]

    payload = secrets.token_bytes(3000)
    put = requests.put(file_url(api, sid, "owner/data.bin"), data=payload, headers=api.headers, timeout=60)
    assert put.status_code == 200 and put.json() == {"path": "owner/data.bin", "bytes": len(payload)}
    got = requests.get(file_url(api, sid, "owner/data.bin"), headers=api.headers, timeout=60)
    assert got.status_code == 200 and got.content == payload
    posted = upload(api, sid, tar_of(member("up/one.txt", b"uploaded")))
    assert posted.status_code == 200 and posted.json() == {"files": 1, "bytes": 8}
    assert requests.get(file_url(api, sid, "up/one.txt"), headers=api.headers, timeout=60).content == b"uploaded"
    whole = requests.get(f"{api.base}/api/v1/sessions/{sid}/workspace", headers=api.headers, timeout=60)
    assert whole.status_code == 200
    archive = tarfile.open(fileobj=io.BytesIO(whole.content), mode="r:gz")
    assert archive.extractfile("./owner/data.bin").read() == payload
    assert archive.extractfile("./up/one.txt").read() == b"uploaded"
    assert b"LIE" in archive.extractfile("./wrapper/files.py").read()  # the archive is honest about the plant too

    code, out = container.exec_run(["ls", "-A", "/workspace"], user="agent")
    assert code == 0 and ".planted-ran" not in out.decode().split(), out
    # The plants are live: the command the worker used to run, from the workspace, runs them and is lied to.
    code, out = container.exec_run(["python3", "-m", "wrapper.files", "get", "owner/data.bin"], user="agent",
                                   workdir="/workspace")
    assert out == b"LIE"
    code, out = container.exec_run(["ls", MARKS], user="agent")
    assert {"wrapper", "wrapper.files", "user-usercustomize", "pth"} <= set(out.decode().split()), out


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_a_sparse_tar_bomb_is_refused_and_nothing_is_written(box, fmt, tmp_path):
    api, sid, container = box
    if shutil.which("tar") is None:
        pytest.fail("GNU tar is needed to make a sparse archive: apt-get install tar")
    (tmp_path / "first.txt").write_bytes(b"written first")
    subprocess.run(["truncate", "-s", "1G", str(tmp_path / "bomb")], check=True)
    bomb = subprocess.run(["tar", "--sparse", f"--format={fmt}", "-czf", "-", "-C", str(tmp_path), "first.txt",
                           "bomb"], check=True, capture_output=True).stdout
    assert len(bomb) < 1024  # a few hundred bytes that would unpack to 1 GiB
    before = listing(container)
    refused(upload(api, sid, bomb), 422, "invalid_archive")
    assert listing(container) == before


def test_a_gzip_bomb_is_refused_at_the_cap_and_nothing_is_written(box):
    api, sid, container = box
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", compresslevel=9) as archive:
        first, data = member("first.txt", b"written first")
        archive.addfile(first, io.BytesIO(data))
        zeros = tarfile.TarInfo("zeros")
        zeros.size = 64 << 20
        archive.addfile(zeros, Zeros(zeros.size))
    bomb = out.getvalue()
    assert len(bomb) < 256 << 10  # 64 MiB of zeros in well under a quarter of a MiB
    before = listing(container)
    refused(upload(api, sid, bomb), 413, "archive_too_large")
    # Members each under the cap, but past it together; and a header that is itself a bomb (a 16 MiB pax record).
    chunks = [member(f"part{i}", bytes(3 << 20)) for i in range(4)]
    refused(upload(api, sid, tar_of(member("first.txt", b"written first"), *chunks)), 413, "archive_too_large")
    huge_header = member("first.txt", b"written first", pax_headers={"comment": "x" * (16 << 20)})
    refused(upload(api, sid, tar_of(huge_header, mode="w:gz")), 413, "archive_too_large")
    assert listing(container) == before


@pytest.mark.parametrize("kind, attrs", [
    (tarfile.SYMTYPE, {"linkname": "/etc"}), (tarfile.LNKTYPE, {"linkname": "first.txt"}),
    (tarfile.CHRTYPE, {"devmajor": 1, "devminor": 3}), (tarfile.BLKTYPE, {"devmajor": 8, "devminor": 0}),
    (tarfile.FIFOTYPE, {})], ids=["symlink", "hardlink", "char-device", "block-device", "fifo"])
def test_links_devices_and_fifos_in_an_archive_are_refused_and_nothing_is_written(box, kind, attrs):
    api, sid, container = box
    before = listing(container)
    archive = tar_of(member("first.txt", b"written first"), member("odd", None, kind, **attrs))
    refused(upload(api, sid, archive), 422, "invalid_archive")
    assert listing(container) == before


def test_an_archive_through_a_symlink_the_agent_made_is_refused_and_nothing_is_written(box):
    api, sid, container = box
    run(api, sid, "ln -sfn /tmp /workspace/out")
    before = listing(container)
    refused(upload(api, sid, tar_of(member("first.txt", b"written first"), member("out/evil", b"x"))), 422,
            "invalid_path")
    assert listing(container) == before
    code, out = container.exec_run(["ls", "-A", "/tmp"], user="agent")
    assert b"evil" not in out


def test_an_archive_past_the_member_cap_is_refused_and_one_at_it_is_unpacked(box):
    api, sid, container = box
    before = listing(container)
    refused(upload(api, sid, tar_of(*(member(f"many/f{i}") for i in range(MEMBERS + 1)))), 413,
            "archive_too_large")
    assert listing(container) == before
    posted = upload(api, sid, tar_of(*(member(f"many/f{i}") for i in range(MEMBERS))))
    assert posted.status_code == 200 and posted.json() == {"files": MEMBERS, "bytes": 0}


def test_a_download_past_the_limit_is_413_and_a_smaller_one_still_works(box):
    api, sid, _container = box
    run(api, sid, f"head -c {DOWNLOAD + 1} /dev/urandom > /workspace/big.bin && head -c {DOWNLOAD} /dev/urandom "
                  "> /workspace/limit.bin")
    refused(requests.get(file_url(api, sid, "big.bin"), headers=api.headers, timeout=60), 413, "download_too_large")
    got = requests.get(file_url(api, sid, "limit.bin"), headers=api.headers, timeout=60)
    assert got.status_code == 200 and len(got.content) == DOWNLOAD
    # The workspace, random bytes and all, is past the limit as tar.gz too.
    whole = requests.get(f"{api.base}/api/v1/sessions/{sid}/workspace", headers=api.headers, timeout=60)
    refused(whole, 413, "download_too_large")
    # A terabyte of holes compresses to next to nothing, but is refused on its size, not read for an hour.
    run(api, sid, "rm /workspace/big.bin /workspace/limit.bin && truncate -s 1T /workspace/holes")
    started = time.monotonic()
    refused(requests.get(f"{api.base}/api/v1/sessions/{sid}/workspace", headers=api.headers, timeout=60), 413,
            "download_too_large")
    refused(requests.get(file_url(api, sid, "holes"), headers=api.headers, timeout=60), 413, "download_too_large")
    assert time.monotonic() - started < 30
    run(api, sid, "rm /workspace/holes")
    assert requests.get(f"{api.base}/api/v1/sessions/{sid}/workspace", headers=api.headers,
                        timeout=60).status_code == 200


def test_a_helper_flooding_its_output_is_cut_off_at_the_limit(box, files_stack):
    """What the worker reads back from any helper is bounded: the runtime stops reading past the limit."""
    _api, _sid, container = box
    runtime = DockerRuntime(files_stack["settings"])
    flood = ["sh", "-c", "head -c 200000000 /dev/zero"]
    with tempfile.TemporaryFile() as spool:
        with pytest.raises(OutputTooLarge):
            runtime.exec_io(container.id, flood, stdout=spool, max_stdout=1 << 20)
        assert spool.tell() <= 1 << 20
    with pytest.raises(OutputTooLarge):  # a helper whose output is dropped (a cancel) is bounded too
        runtime.run(container.id, flood)
    assert runtime.exec_io(container.id, ["sh", "-c", "head -c 1000 /dev/zero"], max_stdout=1000).exit_code == 0
