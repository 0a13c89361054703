"""Starting Ray for a run (or joining a cluster) with its files inside the run directory, and stopping it.

Ray puts unix sockets under its temp dir and refuses paths longer than the kernel's limit (107 bytes); when
`<run_dir>/ray` is too long for that, Ray gets a short symlink (`/tmp/rlray-XXXX/r`) to it instead, removed
at shutdown, so the files still live in the run directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import attrs

from rlcore.errors import ConfigError, PluginError

log = logging.getLogger("rlcore.ray")

SOCKET_SUFFIX = "/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store"
"""The longest socket path Ray builds under its temp dir (session name with a 7-digit pid)."""
SOCKET_LIMIT = 107


@attrs.define
class RaySession:
    """The driver's connection to Ray: a local instance started for the run, or a joined cluster."""

    temp_dir: Path | None
    """Where a local instance keeps its sessions, logs and spilled objects (`<run_dir>/ray`); None when joined."""
    link: Path | None = None
    """The short symlink Ray was given instead of `temp_dir`, if that was too long."""
    owned: bool = True
    """Whether `ray.init` was called here (so `stop` disconnects or shuts Ray down)."""

    @property
    def logs(self) -> str:
        """Where the workers' stdout and stderr go, for error messages."""
        if self.temp_dir is None:
            return "the cluster's Ray session logs (/tmp/ray/session_latest/logs on each node)"
        return str(self.temp_dir / "session_latest" / "logs")

    def stop(self) -> None:
        """Shut down the local instance (or disconnect from the cluster) and remove the symlink."""
        import ray

        if self.owned and ray.is_initialized():
            ray.shutdown()
        if self.link is not None:
            shutil.rmtree(self.link.parent, ignore_errors=True)
            self.link = None


def short_link(temp_dir: Path) -> Path | None:
    """A short symlink to `temp_dir` when Ray's socket paths under it would be too long, else None."""
    if len(str(temp_dir)) + len(SOCKET_SUFFIX) <= SOCKET_LIMIT:
        return None
    link = Path(tempfile.mkdtemp(prefix="rlray-", dir="/tmp")) / "r"
    link.symlink_to(temp_dir, target_is_directory=True)
    return link


def start(run_dir: Path, address: str, resource: str, devices: int) -> RaySession:
    """`ray.init` for this run: join `address`, or start a local instance with `devices` of `resource`
    (only CPU counts are set; GPUs and NPUs are detected) whose temp dir is `<run_dir>/ray`. A Ray
    already initialised in this process (a user's script) is used as is and left running."""
    try:
        import ray
    except ImportError:
        raise PluginError("placement 'ray' needs Ray: pip install 'rlcore-backends[ray]'") from None
    if ray.is_initialized():
        return RaySession(temp_dir=None, owned=False)
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as e:
            raise ConfigError(f"placement.address={address!r}: no Ray cluster answers there ({e}); start one with "
                              "`ray start --head`, or leave placement.address empty for a local instance") from None
        return RaySession(temp_dir=None)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp_dir = (run_dir / "ray").resolve()
    temp_dir.mkdir(parents=True, exist_ok=True)
    session = RaySession(temp_dir=temp_dir, link=short_link(temp_dir))
    given = session.link or temp_dir
    log.info("starting a local Ray instance; its files go to %s%s", temp_dir,
             f" (through the short link {given}: Ray's socket paths must stay under {SOCKET_LIMIT} bytes)"
             if session.link else "")
    try:
        ray.init(num_cpus=devices if resource == "CPU" else None, include_dashboard=False, _temp_dir=str(given),
                 log_to_driver=True)
    except BaseException:
        session.stop()
        raise
    return session
