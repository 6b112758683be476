"""Several machines (nodes) for one run of a recipe: every node runs the same command, with its own --node-rank.

    # on each of 2 nodes; R = 0 or 1, HOST = node 0's address as the other node reaches it
    python -m selfreward.recipes.self_reward --config RUN/config.json --nproc 8 \\
        --nnodes 2 --node-rank R --rdzv-endpoint HOST:29500

- node 0 leads: it runs the stages as on one machine, and each torchrun it starts (a sharded stage, a trainer:
  cli.launch) spans every node by torchrun's static rendezvous at --rdzv-endpoint (node 0 hosts its store; node
  r's ranks are r*nproc .. r*nproc+nproc-1), announced first as RUN/.nodes/SESSION/launch_K.json;
- node r > 0 follows: it starts the same torchrun as node r for each announcement and does nothing else, so the
  work of one process (prompts, pairs, merging the shards, manifests, exports) is done once, by node 0, while
  the others wait; it stops when node 0 ends (RUN/.nodes/SESSION/end.json), failing if node 0 failed, or
  when node 0's heartbeat has not changed for --rdzv-timeout seconds;
- RUN is one folder every node sees (a shared filesystem: rank 0 merges every rank's shard from RUN, every
  rank writes the trainers' checkpoints, the announcements go through it). Checked at the start: each follower
  leaves a token with a fresh nonce in node 0's session folder (named by a fresh nonce of node 0's) and goes on
  only once node 0 names that token back, within --rdzv-timeout seconds; the session folder is removed at the end.
"""

import shutil
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from selfreward import cli
from selfreward.records import DataError, read_json, write_json

POLL = 0.5           # seconds between looks at RUN/.nodes (a shared filesystem may show a new file a little late)
_LEAD: dict = {}     # while node 0 leads (lead()): its config, session folder and launches so far, for torchrun()


@dataclass
class NodeConfig:
    """A recipe config's machines: the config inherits these fields (and their flags)."""
    nnodes: int = cli.passive(1)          # machines running this same command, each with its --node-rank
    node_rank: int = cli.passive(0)       # this machine, 0..nnodes-1: node 0 runs the stages, the others join its torchruns
    rdzv_endpoint: str = cli.passive("")  # HOST:PORT of node 0, reached by every node (torchrun's static rendezvous)
    rdzv_timeout: int = cli.passive(600)  # seconds a node waits for the others at the start, and for node 0's heartbeat

    def check_nodes(self) -> None:
        if self.node_rank >= self.nnodes:
            raise cli.ConfigError(f"--node-rank {self.node_rank}: must be below --nnodes {self.nnodes}")
        host, _, port = self.rdzv_endpoint.rpartition(":")
        if self.nnodes > 1 and not (host and port.isdigit() and 0 < int(port) < 65536):
            raise cli.ConfigError(f"--rdzv-endpoint {self.rdzv_endpoint!r}: --nnodes {self.nnodes} needs HOST:PORT, "
                                  f"an address and a free port of node 0 that every node reaches (e.g. node001:29500)")


def home(cfg) -> Path:
    return Path(cfg.run_dir) / ".nodes"


def leading() -> bool:
    return bool(_LEAD)


def _wait(ready: Callable, seconds: float, error: Callable[[], str]):
    """ready()'s first true value, looked for every POLL seconds; after `seconds`, a DataError(error())."""
    end = time.monotonic() + seconds
    while not (got := ready()):
        if time.monotonic() > end:
            raise DataError(error())
        time.sleep(POLL)
    return got


def _beat(s: Path, stop: threading.Event, every: float) -> None:
    n = 0
    while not stop.wait(every):
        n += 1
        with suppress(OSError):
            write_json(s / "beat.json", n)


@contextmanager
def lead(cfg):
    """Node 0 of nnodes > 1 (the caller holds RUN's lock; nothing for one node): the start-up check, then every
    torchrun() spans the nodes; at the end, or on an error, the followers are told (end.json)."""
    if getattr(cfg, "nnodes", 1) <= 1:
        yield
        return
    root = home(cfg)
    shutil.rmtree(root, ignore_errors=True)          # an earlier session's (RUN's lock says none is running)
    s = root / uuid.uuid4().hex
    s.mkdir(parents=True)
    write_json(root / "leader.json", {"session": s.name, "nnodes": cfg.nnodes})
    others = range(1, cfg.nnodes)
    missing = lambda: [str(r) for r in others if not (s / f"node_{r}.json").exists()]   # noqa: E731
    try:
        _wait(lambda: not missing(), cfg.rdzv_timeout, lambda: (
            f"{s}: node(s) {', '.join(missing())} did not check in within --rdzv-timeout {cfg.rdzv_timeout} s: "
            f"start this command on every node with its --node-rank and a --run-dir that every node sees as the "
            f"same folder (a shared filesystem)"))
        tokens = {str(r): read_json(s / f"node_{r}.json") for r in others}
        if other := [r for r, t in tokens.items() if t["nnodes"] != cfg.nnodes]:
            raise DataError(f"{s}: node(s) {', '.join(other)} run with another --nnodes than this node's {cfg.nnodes}")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    write_json(s / "ready.json", {"nodes": {r: t["nonce"] for r, t in tokens.items()}})
    stop = threading.Event()
    threading.Thread(target=_beat, args=(s, stop, min(30.0, cfg.rdzv_timeout / 4)), daemon=True).start()
    _LEAD.update(cfg=cfg, session=s, launches=0)
    error = None
    try:
        yield
    except BaseException as e:
        error = str(e) or type(e).__name__
        raise
    finally:
        _LEAD.clear()
        stop.set()
        write_json(s / "end.json", {"error": error})
        # the folder goes once every follower has seen the end (a dead one leaves it to the next run's start)
        with suppress(DataError):
            _wait(lambda: all((s / f"done_{r}").exists() for r in others), min(60, cfg.rdzv_timeout), str)
            shutil.rmtree(root, ignore_errors=True)


def _joined(cfg, me: str, wrote: set) -> Path | None:
    """Node r's token in node 0's current session (once per session) -> the session, once node 0 names it back."""
    if not (lead := read_json(home(cfg) / "leader.json")):
        return None
    s = home(cfg) / lead["session"]
    if s.name not in wrote and s.is_dir():       # not a session node 0 has removed meanwhile
        write_json(s / f"node_{cfg.node_rank}.json", {"nonce": me, "nnodes": cfg.nnodes})
        wrote.add(s.name)
    return s if read_json(s / "ready.json").get("nodes", {}).get(str(cfg.node_rank)) == me else None


def follow(cfg) -> None:
    """Node r > 0: join node 0's session, start each torchrun it announces as node r, until node 0 ends."""
    me, wrote = uuid.uuid4().hex, set()
    try:
        s = _wait(lambda: _joined(cfg, me, wrote), cfg.rdzv_timeout, lambda: (
            f"{home(cfg)}: node 0 did not take this node (--node-rank {cfg.node_rank}) in within --rdzv-timeout "
            f"{cfg.rdzv_timeout} s: is node 0 running this command with the same --run-dir and --nnodes, is that "
            f"folder the same one on every node (a shared filesystem), does another node have --node-rank {cfg.node_rank}?"))
    except BaseException:
        for name in wrote:                       # this node's tokens in sessions that did not take it
            if read_json(tok := home(cfg) / name / f"node_{cfg.node_rank}.json").get("nonce") == me:
                tok.unlink(missing_ok=True)
        raise
    k, beat, heard = 0, None, time.monotonic()
    try:
        while not (s / "end.json").exists():
            if (s / f"launch_{k}.json").exists():
                a = read_json(s / f"launch_{k}.json")
                _torchrun(_rdzv(cfg, a["nproc"], cfg.node_rank, f"{s.name}-{k}"), a["argv"])
                k, heard = k + 1, time.monotonic()
                continue
            if (now := read_json(s / "beat.json") or None) != beat:
                beat, heard = now, time.monotonic()
            elif time.monotonic() - heard > cfg.rdzv_timeout:
                raise cli.Stopped(f"{s}: no heartbeat from node 0 for --rdzv-timeout {cfg.rdzv_timeout} s "
                                  f"(it was killed, or lost the folder); node {cfg.node_rank} stops too")
            time.sleep(POLL)
        if error := read_json(s / "end.json")["error"]:
            raise cli.Stopped(f"node 0 stopped: {error}")
    finally:
        with suppress(OSError):
            (s / f"done_{cfg.node_rank}").touch()


def _rdzv(cfg, nproc: int, node_rank: int, run_id: str) -> list[str]:
    return [f"--nnodes={cfg.nnodes}", f"--node-rank={node_rank}", f"--rdzv-endpoint={cfg.rdzv_endpoint}",
            f"--rdzv-id={run_id}", f"--nproc-per-node={nproc}"]


def _torchrun(opts: list[str], argv: list[str]) -> None:
    if (rc := subprocess.run([sys.executable, "-m", "torch.distributed.run", *opts, *argv]).returncode) != 0:
        raise RuntimeError(f"torchrun {' '.join(opts + argv)}: exit {rc}")


def torchrun(nproc: int, argv: list[str]) -> None:
    """`torchrun ... ARGV` (ARGV: -m MODULE ...): nproc ranks on this machine, or, while node 0 leads, nproc on
    every node (each launch announced to the followers first, with a rendezvous id of its own)."""
    if not _LEAD:
        return _torchrun(["--standalone", f"--nproc-per-node={nproc}"], argv)
    s, k = _LEAD["session"], _LEAD["launches"]
    write_json(s / f"launch_{k}.json", {"nproc": nproc, "argv": argv})
    _LEAD["launches"] += 1
    _torchrun(_rdzv(_LEAD["cfg"], nproc, 0, f"{s.name}-{k}"), argv)
