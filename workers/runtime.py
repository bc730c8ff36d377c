"""The Docker runtime: one hardened container per session, named from its id, and exec into it."""
from __future__ import annotations

import io
import json
import logging
import socket
import struct
import time
import uuid
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import docker
from docker.errors import APIError, NotFound
from docker.types import DriverConfig, LogConfig, Mount, Ulimit
from docker.utils.socket import STDOUT, frames_iter

from core.errors import Unavailable
from core.limits import session_limits
from core.settings import Settings
from workers.host_firewall import Gate

log = logging.getLogger(__name__)

AGENT_USER = "agent"
def helper(module: str) -> list[str]:
    """The interpreter line for one of our in-container modules (wrapper/<module>.py, from the image's PYTHONPATH).

    -S: no site, so neither a user site-packages nor a sitecustomize/usercustomize the agent wrote is imported (and
    site's start-up would cost every turn a few ms); -P: nothing from the working directory (the agent's workspace)
    is imported in place of ours; -c rather than -m: runpy costs ~4 ms more. The environment is the image's and the
    worker's only: an exec inherits nothing from the agent's processes.
    """
    return ["python3", "-S", "-P", "-c", f"import sys; from wrapper.{module} import main; sys.exit(main(sys.argv[1:]))"]


# The in-container wrapper. wrapper/serve.py starts runs with the same line.
WRAPPER = helper("__main__")
# Where helpers run: not the agent's workspace, so nothing a helper resolves from its working directory is the agent's.
HELPER_DIR = "/"
# What the worker reads back from a helper unless told more (its JSON summary, a cancel's exit): a flood is an error.
HELPER_OUTPUT_BYTES = 1 << 20
# How long a container's turn agent (wrapper/serve.py) may take to accept a turn before the worker gives up on it.
AGENT_ANSWER_SECONDS = 30.0
# The agent's own lines around a run's records: "<marker>\t<nonce>[\t<value>]" (see wrapper/serve.py).
AGENT_MARKERS = ("accepted", "start", "end", "stale", "done")
# How long a control command (an approval's answer, an interrupt) may take to be answered.
CONTROL_ANSWER_SECONDS = 10.0


def disk_limit_mb(config: dict, settings: Settings) -> int:
    """The session's disk limit in MB (config.limits.disk_mb, else CCD_DISK_MB_DEFAULT), never above CCD_MAX_DISK_MB."""
    asked = (config.get("limits") or {}).get("disk_mb") or settings.disk_mb_default
    return min(int(asked), settings.max_disk_mb)


class NotRunning(Exception):
    """The container to exec in is missing or not running (the engine said 404 or 409)."""


class OutputTooLarge(Exception):
    """A helper wrote more than the worker reads back from it; the worker stopped reading."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the helper wrote more than {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class ExecResult:
    exit_code: int | None
    stderr: str


class DockerRuntime:
    """Creates, starts, stops and removes session containers on this host's Docker engine."""

    def __init__(self, settings: Settings, client: docker.DockerClient | None = None) -> None:
        self.settings = settings
        try:
            self.client = client or docker.from_env(timeout=120)
        except docker.errors.DockerException as exc:
            raise Unavailable(f"cannot reach the Docker engine ({exc}); is dockerd running?") from None
        self.api = self.client.api
        # A local socket needs no proxy or netrc: without this, requests reads the whole environment on every call.
        self.api.trust_env = False
        self._proxy_url: str | None = None
        self._network_checked = False
        self._gateway: str | None = None
        self.firewall = Gate(settings)
        self._sizes_volumes: bool | None = None

    def container_name(self, session_id: str) -> str:
        return f"{self.settings.key_prefix}-session-{session_id}"

    def volume_names(self, session_id: str) -> dict[str, str]:
        base = f"{self.settings.key_prefix}-{session_id}"
        return {"workspace": f"{base}-workspace", "home": f"{base}-home"}

    def ensure_network(self):
        """The sessions' network, created when missing: internal (no route out; the host stays reachable at
        its gateway, where the model proxy and the API listen) and without traffic between containers.

        A network an older version made with a route out is made again when no container is on it;
        while containers are, it is used with a warning (they keep their way out until they are gone).
        """
        name = self.settings.session_network
        try:
            network = self.client.networks.get(name)
        except NotFound:
            return self._create_network(name)
        if network.attrs.get("Internal"):
            return network
        if network.attrs.get("Containers"):
            log.warning("network %s has a route out (made by an older version) and containers on it: session "
                        "containers can reach beyond the host until it is empty and made again", name)
            return network
        log.warning("network %s has a route out (made by an older version); making it again as internal", name)
        try:
            network.remove()
        except (APIError, NotFound) as exc:  # a container joined meanwhile, or another worker removed it
            log.warning("could not remove network %s: %s", name, exc)
        return self.client.networks.get(name) if self._network_exists(name) else self._create_network(name)

    def _network_exists(self, name: str) -> bool:
        try:
            self.client.networks.get(name)
            return True
        except NotFound:
            return False

    def _create_network(self, name: str):
        try:
            options = {"com.docker.network.bridge.enable_icc": "false"}
            if self.settings.session_bridge:  # a fixed interface name lets a firewall outside Docker find it
                options["com.docker.network.bridge.name"] = self.settings.session_bridge
            return self.client.networks.create(name, driver="bridge", internal=True, options=options,
                                               labels={"ccd.network": "sessions"})
        except APIError as exc:  # a concurrent worker made it first
            if exc.status_code != 409:
                raise
            return self.client.networks.get(name)

    def gateway(self) -> str:
        """The Docker host's address on the sessions' network: the one place session containers can reach."""
        network = self.ensure_network()
        network.reload()
        return self._gateway_of(network)

    def _gateway_of(self, network) -> str:
        for config in network.attrs.get("IPAM", {}).get("Config") or []:
            if config.get("Gateway"):
                return config["Gateway"]
        raise Unavailable(f"network {self.settings.session_network} has no gateway address")

    def require_firewall(self, fresh: bool = False) -> None:
        """Returns when session containers may start: the host firewall guards the sessions' network (see
        workers/host_firewall.py); FirewallMissing, saying what to do, when it does not. `fresh`: look again even
        when a check just passed."""
        if fresh or not self.firewall.passed_recently():
            network = self.ensure_network()
            self.firewall.require(network, self._gateway_of(network))

    def model_proxy_url(self) -> str:
        """The model proxy as session containers see it: its configured address, or the gateway."""
        if self._proxy_url is None:
            host = self.settings.model_proxy_host
            if host in ("", "0.0.0.0", "::"):
                host = self.gateway()
            self._proxy_url = f"http://{host}:{self.settings.model_proxy_port}"
        return self._proxy_url

    def session_api_url(self) -> str:
        """The API as session containers see it (CCD_SESSION_API_URL, where `{gateway}` is the network's gateway)."""
        url = self.settings.session_api_url
        if "{gateway}" not in url:
            return url
        if self._gateway is None:  # looked up once, like the proxy's: reloading the network costs every turn
            self._gateway = self.gateway()
        return url.replace("{gateway}", self._gateway)

    def find(self, session_id: str):
        try:
            return self.client.containers.get(self.container_name(session_id))
        except NotFound:
            return None

    def is_running(self, session_id: str) -> bool:
        container = self.find(session_id)
        return container is not None and container.status == "running"

    def session_containers(self) -> dict[str, object]:
        """Every session container of ours on this engine, by session id: from its label, else from its name
        (a warm pool container, taken, keeps its pool labels but carries the session's name)."""
        # ignore_removed: one removed between the list and its inspect (a delete, a disk watcher's helper) is gone.
        found = self.client.containers.list(all=True, filters={"label": f"ccd.prefix={self.settings.key_prefix}"},
                                            ignore_removed=True)
        by_session = {}
        for container in found:
            session_id = container.labels.get("ccd.session") or self.session_of(container.name)
            if session_id:
                by_session[session_id] = container
        return by_session

    def session_of(self, container_name: str) -> str | None:
        """The session id in a session container's name; None for any other name."""
        prefix = self.container_name("")
        if not container_name.startswith(prefix):
            return None
        try:
            return str(uuid.UUID(container_name[len(prefix):]))
        except ValueError:
            return None

    def ensure_running(self, session_id: str, owner: str, config: dict, new: bool = False) -> tuple[str, str]:
        """The session's container, created if missing and started if stopped.

        Returns its id and what it took: "running" (nothing), "started" or "created" (new, empty
        volumes when they were missing too), so the caller knows whether to restore a workspace.
        `new` says the session has had no container yet: creating comes first (a retry finds it by the 409).
        """
        container = None if new else self.find(session_id)
        how = "running"
        if container is None or container.status != "running":
            self.require_firewall()
        if container is None:
            container, how = self._create(session_id, owner, config), "created"
        if container.status != "running":
            container.start()
            how = "started" if how == "running" else how
        return container.id, how

    def _create(self, session_id: str, owner: str, config: dict):
        limits = {**session_limits(config, self.settings), "disk_mb": disk_limit_mb(config, self.settings)}
        labels = {"ccd.session": session_id, "ccd.owner": owner, "ccd.prefix": self.settings.key_prefix}
        try:
            return self.create_container(self.container_name(session_id), labels, self.volume_names(session_id),
                                         limits)
        except APIError as exc:
            if exc.status_code == 409:  # a retried start: the container is already there
                return self.client.containers.get(self.container_name(session_id))
            raise

    def create_container(self, name: str, labels: dict, volumes: dict[str, str], limits: dict):
        """A hardened, created (not started) container: the one recipe for session and warm pool containers.

        Its named volumes are made with it, with the same labels, when missing.
        """
        if not self._network_checked:  # once per process: a network removed since shows up as a 404 below
            self.ensure_network()
            self._network_checked = True
        # Where the volume driver can size a volume, each is capped at disk_mb by the driver (writes past it fail);
        # the disk watcher (workers/disk_quota.py) caps the two together either way.
        sized = DriverConfig("local", {"size": f"{int(limits['disk_mb'])}m"}) \
            if limits.get("disk_mb") and self.sizes_volumes() else None
        mounts = [Mount(target, volumes[key], type="volume", labels=labels, driver_config=sized)
                  for key, target in (("workspace", "/workspace"), ("home", "/home/agent"))]
        host = self.api.create_host_config(
            init=True,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            # Only the volumes and a size-limited /tmp are writable (exec allowed there, as on /workspace:
            # tools unpack and run helpers in /tmp; nosuid, so nothing there can gain privileges).
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,exec,size={self.settings.tmp_mb}m,mode=1777"},
            mem_limit=f"{int(limits['memory_mb'])}m",
            memswap_limit=f"{int(limits['memory_mb'])}m",  # no swap: a memory hog is killed, not slowed
            nano_cpus=int(float(limits["cpus"]) * 1e9),
            pids_limit=int(limits["pids"]),
            # Open files and sockets: one container opening thousands cannot run the host's table down.
            ulimits=[Ulimit(name="nofile", soft=self.settings.nofile, hard=self.settings.nofile)],
            mounts=mounts,
            network_mode=self.settings.session_network,
            # What the turn agent prints is turns' output, read live by the worker and kept in the turn logs:
            # a log driver would only spend the engine's CPU and disk on a copy.
            log_config=LogConfig(type=LogConfig.types.NONE),
        )
        # The turn agent (wrapper/serve.py), reached on its stdin: a turn is an attach, not an exec.
        config = self.api.create_container_config(
            self.settings.image, WRAPPER + ["serve"], hostname="session", user=AGENT_USER,
            working_dir="/workspace", labels=labels, stdin_open=True, host_config=host)
        # docker-py sets StdinOnce with stdin_open (as `docker run -i` does): the first attach to end would then
        # close the agent's stdin for good.
        config["StdinOnce"] = False
        try:
            return self.client.containers.get(self.api.create_container_from_config(config, name)["Id"])
        except APIError as exc:
            if exc.status_code == 404 and "image" in str(exc).lower():
                raise Unavailable(f"session image {self.settings.image} is missing; run `make image`") from None
            if exc.status_code == 404 and "network" in str(exc).lower() and self._network_checked:
                self._network_checked = False  # removed since we looked (an engine reset): make it, then retry
                return self.create_container(name, labels, volumes, limits)
            raise

    def sizes_volumes(self) -> bool:
        """Whether the engine's local volume driver takes a `size` (XFS with project quotas): asked once per
        process, by making a sized volume. ext4 and overlay2 answer "quota size requested but no quota support"."""
        if self._sizes_volumes is None:
            name = f"{self.settings.key_prefix}-size-probe-{uuid.uuid4().hex[:12]}"
            try:
                self.api.create_volume(name, driver="local", driver_opts={"size": "16m"},
                                       labels={"ccd.prefix": self.settings.key_prefix})
                self.remove_volumes([name])
                self._sizes_volumes = True
            except APIError as exc:
                log.info("the engine's volumes cannot be sized (%s): the disk watcher alone enforces "
                         "config.limits.disk_mb", exc.explanation or exc)
                self._sizes_volumes = False
        return self._sizes_volumes

    def stop(self, session_id: str, grace_seconds: int = 10) -> None:
        container = self.find(session_id)
        if container is not None and container.status in ("running", "restarting", "paused"):
            container.stop(timeout=grace_seconds)

    def remove(self, session_id: str) -> None:
        """Removes the container and its volumes; missing parts are fine (removal is retried)."""
        container = self.find(session_id)
        if container is not None:
            self.remove_container(container)
        self.remove_volumes(self.volume_names(session_id).values())

    def remove_container(self, container) -> None:
        """Removes a container of ours and the named volumes it mounts (a container taken from the warm
        pool keeps its pool volumes' names, so they are read from its mounts, not derived from the session)."""
        mounted = self.mounted_volumes(container)
        try:
            container.remove(force=True)
        except NotFound:
            pass  # removed meanwhile (a concurrent check or delete); its volumes may still be there
        except APIError as exc:
            if exc.status_code != 409:
                raise
            self._wait_removed(container.id)  # being removed by a concurrent check or delete: its volumes free after
        self.remove_volumes(mounted)

    def mounted_volumes(self, container) -> list[str]:
        """The names of our volumes a container mounts (from a list or an inspect of it)."""
        ours = f"{self.settings.key_prefix}-"
        return [m["Name"] for m in container.attrs.get("Mounts") or []
                if m.get("Type") == "volume" and (m.get("Name") or "").startswith(ours)]

    def _wait_removed(self, container_id: str, seconds: float = 10.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.api.inspect_container(container_id)
            except NotFound:
                return
            time.sleep(0.1)

    def remove_volumes(self, names) -> None:
        """Removes these volumes; missing ones are fine."""
        for name in names:
            try:
                self.api.remove_volume(name, force=True)
            except NotFound:
                pass

    def run(self, container_id: str, argv: list[str]) -> int | None:
        """Runs a short helper in the container as the agent user (its output read and dropped, within
        HELPER_OUTPUT_BYTES); returns its exit code."""
        return self.exec_io(container_id, argv).exit_code

    def archive(self, session_id: str, path: str) -> Iterator[bytes] | None:
        """A tar stream of `path` in the session's container (running or stopped); None without a container."""
        container = self.find(session_id)
        if container is None:
            return None
        stream, _stat = container.get_archive(path, chunk_size=1 << 20)
        return stream

    def _exec_stdout(self, container_id: str, argv: list[str], stdin: BinaryIO | None, env: dict[str, str],
                     user: str, result: list[ExecResult], workdir: str = HELPER_DIR) -> Iterator[bytes]:
        """Runs argv in the container, `stdin` copied to its input; yields stdout chunks as they arrive.

        When the generator is exhausted, `result` holds the exit code and captured stderr.
        """
        try:
            exec_id = self.api.exec_create(container_id, argv, stdin=stdin is not None, stdout=True, stderr=True,
                                           environment=env, user=user, workdir=workdir)["Id"]
        except APIError as exc:
            if exc.status_code in (404, 409):
                raise NotRunning(f"container {container_id} is not running: {exc.explanation or exc}") from None
            raise
        sock = self.api.exec_start(exec_id, socket=True)
        raw = getattr(sock, "_sock", sock)
        stderr = bytearray()
        try:
            if stdin is not None:
                while chunk := stdin.read(1 << 20):
                    raw.sendall(chunk)
                raw.shutdown(socket.SHUT_WR)  # EOF on the process's stdin
            yield from stdout_of(frames_iter(sock, tty=False), stderr)
        finally:
            sock.close()
        code = self.api.exec_inspect(exec_id).get("ExitCode")
        result.append(ExecResult(code, stderr.decode("utf-8", "replace")[-4000:]))

    def exec_io(self, container_id: str, argv: list[str], stdin: BinaryIO | None = None,
                stdout: BinaryIO | None = None, user: str = AGENT_USER,
                max_stdout: int = HELPER_OUTPUT_BYTES) -> ExecResult:
        """Runs a helper (argv) in the container, `stdin` copied to its input and its output copied to `stdout`
        (or dropped). OutputTooLarge, and the exec left, once it writes more than `max_stdout` bytes."""
        result: list[ExecResult] = []
        seen = 0
        chunks = self._exec_stdout(container_id, argv, stdin, {}, user, result)
        try:
            for chunk in chunks:
                seen += len(chunk)
                if seen > max_stdout:
                    raise OutputTooLarge(max_stdout)
                if stdout is not None:
                    stdout.write(chunk)
        finally:
            chunks.close()  # closes the exec's socket when we stop early
        return result[0]

    def exec_lines(self, container_id: str, argv: list[str], env: dict[str, str], stdin: bytes,
                   result: list[ExecResult], max_line: int = 0, workdir: str = HELPER_DIR) -> Iterator[tuple[str, int]]:
        """Runs argv in the container with `stdin` as input; yields (line, size) as lines arrive (see
        `split_lines`). When the generator is exhausted, `result` holds the exit code and captured stderr."""
        yield from split_lines(self._exec_stdout(container_id, argv, io.BytesIO(stdin), env, AGENT_USER, result,
                                                 workdir), max_line)

    def turn_lines(self, container: str, args: list[str], env: dict[str, str], prompt: bytes,
                   result: list[ExecResult], max_line: int = 0, on_start=None) -> Iterator[tuple[str, int]]:
        """Runs `wrapper <args>` for a turn, as `exec_lines` does: through the container's turn agent
        (wrapper/serve.py) when it has one, else (a container made before there was one) as an exec.
        NotRunning when the container is missing or stopped: an attach to a stopped container would wait."""
        attrs = self._running(container)
        if not attrs:
            raise NotRunning(f"container {container} is missing or not running")
        if not (attrs.get("Config") or {}).get("OpenStdin"):
            # Claude Code works where it starts: the workspace (the turn agent starts its runs there too).
            yield from self.exec_lines(container, WRAPPER + args, env, prompt, result, max_line, "/workspace")
            return
        yield from self._agent_lines(container, args, env, prompt, result, max_line, on_start)

    def _agent_lines(self, container: str, args: list[str], env: dict[str, str], prompt: bytes,
                     result: list[ExecResult], max_line: int, on_start=None) -> Iterator[tuple[str, int]]:
        """Asks the container's turn agent for a run and yields its lines (the agent's markers, and anything
        before this run's start, left out). `on_start` is called with the id of the Claude Code process the
        turn runs in, as the agent says so."""
        nonce = uuid.uuid4().hex
        request = {"nonce": nonce, "expires": time.time() + AGENT_ANSWER_SECONDS, "args": args, "env": env,
                   "prompt": prompt.decode("utf-8", "replace")}
        try:
            sock = self.api.attach_socket(container, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
        except APIError as exc:
            if exc.status_code in (404, 409):  # removed or stopped since the look above
                raise NotRunning(f"container {container} is not running: {exc.explanation or exc}") from None
            raise
        raw = getattr(sock, "_sock", sock)
        stderr, code, started = bytearray(), None, False
        try:
            raw.settimeout(AGENT_ANSWER_SECONDS)  # until it answers; a turn's own length is the wrapper's to limit
            raw.sendall(json.dumps(request).encode() + b"\n")
            for line, size in split_lines(stdout_of(read_frames(raw), stderr), max_line):
                kind, _, rest = line.partition("\t")
                if kind not in AGENT_MARKERS:
                    if started:  # a record of this run (anything before its start is another's)
                        yield line, size
                    continue
                of, _, value = rest.partition("\t")
                if of != nonce:
                    continue
                if kind == "accepted":
                    raw.settimeout(None)
                elif kind == "start":
                    started = True
                    if on_start is not None:
                        on_start(value)
                elif kind == "end":
                    code = int(value or 0)
                    break
                else:
                    raise RuntimeError("the container's turn agent had the turn only after its worker gave up")
        except TimeoutError:
            if not self._running(container):  # it stopped as it was asked: the request is stale now, start it again
                raise NotRunning(f"container {container} stopped before its turn agent answered") from None
            raise RuntimeError(f"the container's turn agent did not answer within {AGENT_ANSWER_SECONDS:.0f} s; "
                               "the container may be overloaded") from None
        finally:
            sock.close()
        result.append(ExecResult(code, stderr.decode("utf-8", "replace")[-4000:]))

    def agent_control(self, container: str, command: dict) -> str:
        """Sends the container's turn agent a control command (wrapper/serve.py: answer, interrupt, cool) through an
        attach; its outcome (ok, unknown, idle, busy). NotRunning when the container is not running."""
        nonce = uuid.uuid4().hex
        request = {**command, "nonce": nonce, "expires": time.time() + CONTROL_ANSWER_SECONDS}
        try:
            sock = self.api.attach_socket(container, params={"stdin": 1, "stdout": 1, "stream": 1})
        except APIError as exc:
            if exc.status_code in (404, 409):
                raise NotRunning(f"container {container} is not running: {exc.explanation or exc}") from None
            raise
        raw = getattr(sock, "_sock", sock)
        try:
            raw.settimeout(CONTROL_ANSWER_SECONDS)
            raw.sendall(json.dumps(request).encode() + b"\n")
            # The stream carries whatever the agent prints (a running turn's records too): only our answer counts.
            marker = f"done\t{nonce}\t"
            for line, _size in split_lines(stdout_of(read_frames(raw), bytearray()), 1 << 16):
                if line.startswith(marker):
                    return line[len(marker):]
        except TimeoutError:
            raise RuntimeError(f"the container's turn agent did not answer a control command within "
                               f"{CONTROL_ANSWER_SECONDS:.0f} s") from None
        finally:
            sock.close()
        raise NotRunning(f"container {container} stopped before its turn agent answered")

    def _running(self, container: str) -> dict | None:
        """The container's inspect, if it is running."""
        try:
            attrs = self.api.inspect_container(container)
        except NotFound:
            return None
        return attrs if (attrs.get("State") or {}).get("Running") else None



def stdout_of(frames: Iterator[tuple[int, bytes]], stderr: bytearray) -> Iterator[bytes]:
    """An attached or exec'd stream's stdout chunks, from its (stream, data) frames; the tail of its stderr goes
    to `stderr`."""
    for stream, chunk in frames:
        if stream == STDOUT:
            yield chunk
        else:
            stderr.extend(chunk[-8192:])
            del stderr[:-8192]


def read_frames(raw: socket.socket) -> Iterator[tuple[int, bytes]]:
    """The (stream, data) frames of a multiplexed attach or exec stream. Unlike docker-py's frames_iter, which
    polls before each read with no time limit, this keeps to the socket's timeout."""
    buffer = bytearray()
    while chunk := raw.recv(1 << 16):
        buffer += chunk
        while len(buffer) >= 8:
            stream, length = struct.unpack_from(">BxxxL", buffer)
            if len(buffer) < 8 + length:
                break
            yield stream, bytes(buffer[8:8 + length])
            del buffer[:8 + length]


def split_lines(chunks: Iterator[bytes], max_line: int = 0) -> Iterator[tuple[str, int]]:
    """Lines of a byte stream as (line, size), as they arrive. With `max_line`, a longer line is cut to that many
    bytes (size says how long it was), so a flood without newlines cannot fill the worker's memory."""
    pending, size = bytearray(), 0
    for chunk in chunks:
        start = 0
        while start <= len(chunk):
            newline = chunk.find(b"\n", start)
            piece = chunk[start:] if newline < 0 else chunk[start:newline]
            size += len(piece)
            room = max_line - len(pending) if max_line else len(piece)
            pending += piece[:max(0, room)]
            if newline < 0:
                break
            yield pending.decode("utf-8", "replace"), size
            pending, size, start = bytearray(), 0, newline + 1
    if size:
        yield pending.decode("utf-8", "replace"), size
