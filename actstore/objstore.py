"""Object storage: every STORE, RUN and bundle argument may be an fsspec URL (`s3://bucket/path`, …).

Why this module: URLs have no rename, no flock and no local free space, and a dead endpoint or a missing
credential must fail in seconds with one line naming the URL, not after minutes of retries with a
botocore traceback. Everything that knows about URLs lives here; the steps call `check` first and then
work on a store URL directly (zarr's FsspecStore) or on a local copy of a run URL (`run_copy`, `run_view`).

Connection settings. s3fs reads the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_PROFILE, AWS_REGION); AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) points it at an
S3-compatible server. `configure` puts short timeouts into fsspec's per-protocol defaults (3 s to
connect, three attempts in botocore's "standard" retry mode), so that zarr's own
opens get them too; a key the user set in fsspec's configuration wins over ours.

Stores on object storage. A Zarr store's commit record lives in the group's `zarr.json` attributes and
zarr writes that object after the batch's chunks (each a single PUT, which S3 makes visible whole or not
at all): data first, commit object last, with no rename needed. `--overwrite` onto a URL holding a store
is refused (replacing a store whole needs the rename it lacks). The writer lock is local only.

Runs on object storage. A run is a directory tree written aside and renamed (atomic.py) and sealed with
SHA256SUMS (integrity.py); neither survives a translation to S3, so a RUN URL is worked on in a local copy
and synchronised through a commit log:

    RUN/_actstore/objects/<sha256[:2]>/<sha256>   every file's bytes, content-addressed, never overwritten
    RUN/_actstore/commits/<20-digit seq>.json     {"add": {path: {sha256, size}}, "remove": [path], …}

A writer uploads the objects of the files it added or changed first, then claims the next sequence number
with one small commit object written last, by a conditional PUT (If-None-Match: *) where the server
honours it; a claim that loses the race re-reads the log and takes the next number. Where the server
ignores the condition, the claim is read back and compared (this narrows the race between writers on
different machines but cannot close it). Readers replay the log in order (later commits win per path)
and take an object only when its bytes match the sha256 listed; a damaged object is a one-line StoreError
naming it. Objects are content-addressed, so an upload killed half way, or two writers adding the same
bytes, never damage what a commit already lists; several writers (torchrun ranks on different nodes, each
training its own SAEs) commit into one run, and a path both change is the later commit's.

The local copy lives under the per-user cache (ACTSTORE_CACHE, else XDG_CACHE_HOME/actstore, else
~/.cache/actstore): `runs/<hash of URL>/work/<name>` for commands that write, `…/view/<name>` for those
that read (sql, report's queries, bundle); under torchrun each rank has its own `work-rank<R>/`. A
writing command pulls (downloads what the log lists and the copy lacks, verified), runs on the copy under
the usual local writer lock, commits after each durable write (a hook on atomic.replacing) and once more
at the end, including after a failure (what was written stays good). A SIGKILL loses at most the write in progress: the same machine resumes from its copy, which still
holds what was not yet committed; a fresh machine resumes from what was committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from actstore.errors import StoreError, UsageError
from actstore.writer_lock import flocked

META = "_actstore"
COMMITS = f"{META}/commits"
OBJECTS = f"{META}/objects"
LOG_FORMAT = 1
CONNECT_TIMEOUT_S = 3
ATTEMPTS = 3  # botocore's "standard" mode: the first try and two retries with jittered backoff
_ours: dict[str, Any] = {}  # the fsspec defaults we set (refreshed from the environment on every call)
_checked: set[tuple[str, str, bool]] = set()


def is_url(text: str | os.PathLike | None) -> bool:
    """True for an fsspec URL other than a local `file://` one (which the steps treat as a path)."""
    if text is None:
        return False
    scheme, sep, _ = str(text).partition("://")
    return bool(sep) and scheme.lower() != "file" and scheme.replace("+", "").replace("-", "").isalnum()


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def _s3_defaults() -> dict[str, Any]:
    opts: dict[str, Any] = {
        "config_kwargs": {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": 60,
            "retries": {"max_attempts": ATTEMPTS, "mode": "standard"},
        },
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


def configure() -> None:
    """Put our S3 defaults into fsspec's configuration (every S3FileSystem, zarr's included, starts from it)."""
    import fsspec.config

    conf = fsspec.config.conf.setdefault("s3", {})
    for key, value in _s3_defaults().items():
        if key not in conf or (key in _ours and conf[key] == _ours[key]):
            conf[key] = _ours[key] = value
    if (
        "endpoint_url" in _ours
        and "endpoint_url" not in _s3_defaults()
        and conf.get("endpoint_url") == _ours["endpoint_url"]
    ):
        del conf["endpoint_url"], _ours["endpoint_url"]  # AWS_ENDPOINT_URL was unset since


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of URL and the path inside it; a one-line error when its package is missing."""
    configure()
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(url)
    except ImportError:
        scheme = url.split("://", 1)[0]
        extra = "s3" if scheme in ("s3", "s3a") else scheme
        raise UsageError(
            f"{url}: {scheme}:// URLs need an fsspec driver that is not installed; pip install 'actstore[{extra}]'"
        ) from None
    except ValueError as exc:
        raise UsageError(f"{url}: {exc}") from None


def endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS's default endpoint"


def check(url: str, write: bool = False) -> None:
    """Fail fast, in one line naming URL and the fix, when it cannot be used: no credentials, an endpoint
    that does not answer, a bucket that does not exist, credentials the server refuses. Checked once per
    (bucket, endpoint) and process."""
    if not is_url(url):
        return
    fs, path = filesystem(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    bucket = path.split("/", 1)[0]
    key = (protocol, f"{bucket}@{endpoint()}", write)
    if key in _checked:
        return
    if protocol in ("s3", "s3a"):
        _probe_s3(fs, url, bucket)
    else:
        try:
            fs.exists(path)
        except Exception as exc:
            raise StoreError(f"cannot reach {url} ({_reason(exc)}); check the URL and the network") from None
    _checked.add(key)


def _probe_s3(fs: Any, url: str, bucket: str) -> None:
    import botocore.exceptions as bexc

    try:
        fs.call_s3("head_bucket", Bucket=bucket)
        return
    except bexc.NoCredentialsError:
        problem = "no credentials"
    except (bexc.EndpointConnectionError, bexc.ConnectTimeoutError, bexc.ReadTimeoutError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            problem = "no bucket"
        elif isinstance(exc, PermissionError):
            problem = "refused"
        else:
            raise StoreError(
                f"cannot reach the object store for {url} at {endpoint()} ({_reason(exc)}); "
                "check AWS_ENDPOINT_URL and the network"
            ) from None
    except bexc.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        problem = "no bucket" if code in ("404", "NoSuchBucket") else "refused"
    except Exception as exc:  # s3fs wraps some of botocore's errors in its own
        text = f"{type(exc).__name__}: {exc}"
        if "credentials" in text.lower():
            problem = "no credentials"
        elif any(w in text for w in ("Connect", "connect", "Timeout", "timed out")):
            raise StoreError(
                f"cannot reach the object store for {url} at {endpoint()} ({_reason(exc)}); "
                "check AWS_ENDPOINT_URL and the network"
            ) from None
        else:
            raise StoreError(f"cannot use {url} ({_reason(exc)})") from None
    if problem == "no credentials":
        raise UsageError(f"no credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    if problem == "no bucket":
        raise UsageError(f"bucket {bucket!r} of {url} does not exist at {endpoint()}; create it first or fix the URL")
    raise UsageError(
        f"the object store at {endpoint()} refused access to bucket {bucket!r} of {url}; "
        "check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the bucket's permissions"
    )


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return bool(fs.exists(path))


def store_settings(url: str) -> dict[str, Any] | None:
    """What `zarr.json` at a store URL holds (None when there is none): harvest's view of an existing store,
    without zarr's habit of treating any failure as "nothing there"."""
    fs, path = filesystem(url)
    try:
        raw = fs.cat_file(f"{path.rstrip('/')}/zarr.json")
    except FileNotFoundError:
        return None
    try:
        return dict(json.loads(raw).get("attributes", {}))
    except (ValueError, AttributeError):
        raise StoreError(f"{url}/zarr.json is not readable JSON; use another URL") from None


# ---- the per-user cache ---------------------------------------------------------------------------------


def cache_root() -> Path:
    """ACTSTORE_CACHE, else XDG_CACHE_HOME/actstore, else ~/.cache/actstore; created private to this user."""
    base = os.environ.get("ACTSTORE_CACHE")
    if base:
        root = Path(base).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "actstore"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return root.absolute()


def url_key(url: str) -> str:
    return hashlib.sha256(f"{url.rstrip('/')}\n{endpoint()}".encode()).hexdigest()[:16]


def download(url: str, what: str = "bundles") -> Path:
    """A single object fetched once into the cache (keyed by URL, size and ETag), written aside first."""
    check(url)
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise UsageError(f"{url} does not exist") from None
    if info.get("type") == "directory":
        raise UsageError(f"{url} is a prefix, not an object; give the .tar or .zip object")
    tag = f"{info.get('size')}|{info.get('ETag') or info.get('etag') or info.get('LastModified')}"
    name = path.rstrip("/").rsplit("/", 1)[-1]
    dest = cache_root() / what / f"{url_key(url)}-{hashlib.sha256(tag.encode()).hexdigest()[:12]}" / name
    if dest.is_file() and dest.stat().st_size == info.get("size"):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{name}.{uuid.uuid4().hex}.partial")
    try:
        fs.get_file(path, str(tmp))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def upload(local: Path, url: str, overwrite: bool) -> None:
    """One local file uploaded as one object (a single PUT, visible whole or not at all)."""
    check(url, write=True)
    fs, path = filesystem(url)
    if not overwrite and fs.exists(path):
        raise UsageError(f"{url} already exists; pass --overwrite to replace it")
    fs.put_file(str(local), path)


# ---- runs: a local copy synchronised through the commit log ----------------------------------------------


def _sha(path: Path) -> str:
    from actstore.integrity import digest

    return digest(path)


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


_SKIP_NAMES = (".writer.lock",)


def _synced(rel: str) -> bool:
    """Whether a file of the local copy belongs to the run (never the lock, staging, or our own metadata)."""
    from actstore.atomic import is_staging

    parts = rel.split("/")
    return not (parts[0] == META or parts[-1] in _SKIP_NAMES or any(is_staging(p) for p in parts))


class RunSync:
    """One local copy of a run URL (`kind` "work" for writers, "view" for readers) and its sync state."""

    def __init__(self, url: str, kind: str):
        self.url = url.rstrip("/")
        self.fs, self.path = filesystem(self.url)
        base = cache_root() / "runs" / url_key(self.url)
        name = self.path.rstrip("/").rsplit("/", 1)[-1] or "run"
        rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else "0"
        kind = kind if rank == "0" or kind != "work" else f"work-rank{rank}"  # torchrun: a copy per rank
        self.root = base / kind / name
        self.state_file = base / f"{kind}.sync.json"
        self.lock_file = base / f"{kind}.lock"
        self.sibling = base / ("work" if kind == "view" else "view") / name  # this machine's other copy
        self.kind = "view" if kind == "view" else "work"
        base.mkdir(parents=True, exist_ok=True)
        (base / "url.txt").write_text(self.url + "\n")
        self.state = self._load()

    # -- state --
    def _load(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_file.read_text())
            if state.get("url") == self.url:
                return state
        except (OSError, ValueError):
            pass
        return {"url": self.url, "seq": 0, "remote": {}, "files": {}}

    def _save(self) -> None:
        tmp = self.state_file.with_name(self.state_file.name + ".partial")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.state_file)

    @contextlib.contextmanager
    def locked(self, command: str, wait: bool) -> Iterator[None]:
        """This copy for one process at a time (writers refuse a second; readers wait their turn)."""
        refusal = f"{self.url} is being worked on from this machine by {{holder}}; wait for it before `{command}`"
        with flocked(self.lock_file, command, refusal, wait=wait, what=f"cannot keep a local copy of {self.url}"):
            yield

    # -- the log --
    def _commit_names(self) -> list[tuple[int, str]]:
        try:
            names = self.fs.ls(join(self.path, COMMITS), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            stem = n.rstrip("/").rsplit("/", 1)[-1]
            if stem.endswith(".json") and stem[:-5].isdigit():
                out.append((int(stem[:-5]), n))
        return sorted(out)

    def _read_commit(self, name: str) -> dict[str, Any]:
        try:
            commit = json.loads(self.fs.cat_file(name))
            if commit.get("format") != LOG_FORMAT or not isinstance(commit.get("add"), dict):
                raise ValueError("not an actstore commit")
            for meta in commit["add"].values():
                if len(str(meta["sha256"])) != 64 or not isinstance(meta["size"], int):
                    raise ValueError("an entry lacks sha256 or size")
            return commit
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise StoreError(
                f"{self.fs.unstrip_protocol(name)} is damaged ({_reason(exc)}); restore it or delete the run's "
                "commits from that one on and re-run the commands that wrote them"
            ) from None

    def replay(self) -> None:
        """Bring `remote` (path -> [sha256, size]) up to the log's last commit."""
        names = self._commit_names()
        if names and names[-1][0] < self.state["seq"]:  # the run was deleted and written afresh: start over
            self.state.update(seq=0, remote={})
        for seq, name in names:
            if seq <= self.state["seq"]:
                continue
            commit = self._read_commit(name)
            for path in commit.get("remove", []):
                self.state["remote"].pop(path, None)
            for path, meta in commit["add"].items():
                self.state["remote"][path] = [meta["sha256"], meta["size"]]
            self.state["seq"] = seq

    def object_url(self, sha: str) -> str:
        return join(self.path, OBJECTS, sha[:2], sha)

    # -- local files --
    def _local(self, under: Path | None = None) -> dict[str, list]:
        """path -> [sha256, size, mtime_ns, inode] of the copy's files, or of those below `under` (hashing only
        those whose stat changed since they were last seen)."""
        out: dict[str, list] = {}
        known = self.state["files"]
        top = under or self.root
        if not top.exists():
            return out
        for p in [top] if top.is_file() else top.rglob("*"):
            if not p.is_file() or p.is_symlink():
                continue
            rel = p.relative_to(self.root).as_posix()
            if not _synced(rel):
                continue
            key = _stat_key(p)
            prior = known.get(rel)
            sha = prior[0] if prior and prior[1:] == key else _sha(p)
            out[rel] = [sha, *key]
        return out

    def pull(self) -> None:
        """Make the copy hold what the log lists (a writer's unsynchronised local changes stay: they are work
        not yet committed), every downloaded file checked against its sha256."""
        self.replay()
        self.root.mkdir(parents=True, exist_ok=True)
        local, files, remote = self._local(), self.state["files"], self.state["remote"]
        keep_local = self.kind == "work"

        def changed_here(rel: str) -> bool:
            return rel in local and (rel not in files or files[rel][0] != local[rel][0])

        for rel, (sha, _size) in sorted(remote.items()):
            if rel in local and local[rel][0] == sha:
                files[rel] = local[rel]
                continue
            if keep_local and changed_here(rel):
                continue
            self._fetch(rel, sha)
            files[rel] = [sha, *_stat_key(self.root / rel)]
        for rel in sorted(set(local) - set(remote)):
            if keep_local and changed_here(rel):
                continue  # made here, not yet committed
            (self.root / rel).unlink(missing_ok=True)
            files.pop(rel, None)
            _prune(self.root, (self.root / rel).parent)
        for rel in list(files):
            if rel not in remote and not (self.root / rel).is_file():
                files.pop(rel)
        self._save()

    def _fetch(self, rel: str, sha: str) -> None:
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.partial")
        try:
            if not self._copy_sibling(rel, sha, tmp):
                try:
                    self.fs.get_file(self.object_url(sha), str(tmp))
                except FileNotFoundError:
                    raise StoreError(
                        f"{self.fs.unstrip_protocol(self.object_url(sha))} ({rel} of {self.url}) is missing; "
                        "re-run the command that wrote it"
                    ) from None
                if _sha(tmp) != sha:
                    raise StoreError(
                        f"{self.fs.unstrip_protocol(self.object_url(sha))} ({rel} of {self.url}) is damaged: its "
                        "sha256 differs from the commit that lists it; re-run the command that wrote it"
                    )
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def _copy_sibling(self, rel: str, sha: str, tmp: Path) -> bool:
        """The same bytes from this machine's other copy of the run (work ↔ view), checked, instead of a download."""
        src = self.sibling / rel
        if not src.is_file():
            return False
        shutil.copyfile(src, tmp)
        return _sha(tmp) == sha

    def push(self, command: str, under: Path | None = None) -> int | None:
        """Commit what changed in the copy (only below `under` when given) since the last sync: objects first,
        then the commit object, claimed conditionally. Returns the commit's sequence number (None: nothing)."""
        local = self._local(under)
        files = self.state["files"]
        prefix = None if under is None else under.relative_to(self.root).as_posix().rstrip("/") + "/"

        def inside(rel: str) -> bool:
            return prefix is None or rel.startswith(prefix) or rel == prefix[:-1]

        add = {r: v for r, v in local.items() if inside(r) and (r not in files or files[r][0] != v[0])}
        remove = sorted(r for r in files if inside(r) and r not in local)
        if not add and not remove:
            return None
        known = {v[0] for v in self.state["remote"].values()}
        for rel, (sha, size, *_) in sorted(add.items()):
            if sha in known:
                continue
            target = self.object_url(sha)
            try:
                if self.fs.info(target).get("size") == size:
                    known.add(sha)
                    continue
            except FileNotFoundError:
                pass
            self.fs.put_file(str(self.root / rel), target)
            known.add(sha)
        commit = {
            "format": LOG_FORMAT,
            "id": uuid.uuid4().hex,
            "writer": f"{socket.gethostname()} pid {os.getpid()}",
            "command": command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "add": {r: {"sha256": v[0], "size": v[1]} for r, v in sorted(add.items())},
            "remove": remove,
        }
        seq = self._claim(commit)
        for rel in remove:
            files.pop(rel, None)
            self.state["remote"].pop(rel, None)
        for rel, v in add.items():
            files[rel] = v
            self.state["remote"][rel] = v[:2]
        self._save()
        return seq

    def _claim(self, commit: dict[str, Any]) -> int:
        for _ in range(100):
            self.replay()  # others' commits first, so that ours is applied after them
            seq = self.state["seq"] + 1
            commit["seq"] = seq
            body = json.dumps(commit, indent=1, sort_keys=True).encode()
            name = join(self.path, COMMITS, f"{seq:020d}.json")
            if _put_if_absent(self.fs, name, body):
                self.state["seq"] = seq
                return seq
        raise StoreError(f"could not claim a commit number in {self.url} after 100 tries; re-run the command")


_conditional: dict[str, bool] = {}  # endpoint -> whether it honours If-None-Match


def _put_if_absent(fs: Any, name: str, body: bytes) -> bool:
    """Write NAME only if no object is there: True when ours is written, False when another claimed it."""
    try:
        fs.pipe_file(name, body, mode="create")
    except FileExistsError:
        return False
    except TypeError:  # an fsspec driver without conditional writes
        if fs.exists(name):
            return False
        fs.pipe_file(name, body)
    except Exception as exc:
        if "PreconditionFailed" in str(exc) or "412" in str(exc) or "ConditionalRequestConflict" in str(exc):
            return False
        raise
    if _conditional.get(endpoint()) is None:
        _conditional[endpoint()] = _honours_condition(fs, name, body)
    if not _conditional[endpoint()]:  # write-then-read-back: narrows, not closes, the race
        return fs.cat_file(name) == body
    return True


def _honours_condition(fs: Any, name: str, body: bytes) -> bool:
    """Once per endpoint: a second conditional PUT of the same commit must be refused."""
    try:
        fs.pipe_file(name, body, mode="create")
    except FileExistsError:
        return True
    except Exception as exc:
        return "PreconditionFailed" in str(exc) or "412" in str(exc)
    return False


def _prune(root: Path, directory: Path) -> None:
    """Remove empty directories from `directory` up to (not including) `root`."""
    while directory != root and root in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def has_log(url: str) -> bool:
    fs, path = filesystem(url)
    try:
        return bool(fs.ls(join(path, COMMITS), detail=False, refresh=True))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def run_copy(url: str, command: str) -> Iterator[Path]:
    """The local copy of the run at URL for a writing command: pulled first, committed after every durable
    write (atomic.replacing) and at the end, also when the command fails."""
    from actstore import atomic

    check(url, write=True)
    sync = RunSync(url, "work")
    with sync.locked(command, wait=False):
        sync.pull()

        def committed(finals: list[Path]) -> None:
            for final in finals:
                final = Path(final).absolute()
                if sync.root == final or sync.root in final.parents:
                    sync.push(command, under=final)

        atomic.after_replace.append(committed)
        try:
            yield sync.root
        except BaseException:
            atomic.after_replace.remove(committed)
            with contextlib.suppress(Exception):
                sync.push(command)
            raise
        atomic.after_replace.remove(committed)
        sync.push(command)


def run_view(url: str) -> Path:
    """A verified local copy of the run at URL, as the log lists it, for reading."""
    check(url)
    sync = RunSync(url, "view")
    with sync.locked("reading", wait=True):
        sync.pull()
    if not sync.state["seq"]:
        raise UsageError(
            f"{url} holds no actstore run (no {COMMITS}/); train into it with `actstore train … --out {url}`"
        )
    return sync.root


def local_run(run: str) -> str:
    """RUN itself, or for a URL the verified local copy of it (for reading)."""
    return str(run_view(run)) if is_url(run) else run


def check_store_target(out: str, overwrite: bool) -> None:
    """Harvest's check of a store URL: reachable, and no `--overwrite` of a store there (replacing a store
    whole needs the rename object storage lacks)."""
    if not is_url(out):
        return
    check(out, write=True)
    fs, path = filesystem(out)
    if store_settings(out) is None and fs.exists(path) and fs.ls(path, detail=False):
        raise UsageError(f"{out} holds objects but no Zarr store; choose an empty or new URL")
    if overwrite and store_settings(out) is not None:
        raise UsageError(
            f"--overwrite cannot replace the store at {out}: object storage has no rename to swap a finished "
            "replacement in; drop --overwrite to resume it, or delete it first"
        )


ARCHIVES = (".tar", ".zip")


def fetch(url: str) -> Path:
    """What a reading command opens at URL, on local disk: a run's verified copy, or a bundle archive
    downloaded into the cache (then screened and verified like any bundle)."""
    check(url)
    if url.rstrip("/").endswith(ARCHIVES):
        return download(url)
    if has_log(url):
        return run_view(url)
    raise UsageError(
        f"{url} is neither a run (it has no {COMMITS}/) nor a .tar/.zip bundle; "
        "give a run URL that `actstore train --out` wrote, or a bundle object"
    )


def download_tree(url: str, parts: list[str]) -> Path:
    """The objects under each of `parts` (relative keys or prefixes) of URL, copied into a fresh cache
    directory with the same layout (a store's tokens and reconstructions for a bundle, say)."""
    check(url)
    fs, path = filesystem(url)
    dest = cache_root() / "trees" / url_key(url)
    shutil.rmtree(dest, ignore_errors=True)  # the previous fetch of this URL's parts
    root = path.rstrip("/")
    for part in parts:
        base = f"{root}/{part.strip('/')}"
        found = fs.find(base) if not fs.isfile(base) else [base]
        for key in found:
            target = dest / key[len(root) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(key, str(target))
    return dest
