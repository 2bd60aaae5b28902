"""Bots under their own OS users: whether the manager can switch users, which user each bot
runs as, and what those users must reach and must not be.

A bot is hostile code. Under an OS user of its own it cannot read the manager's files (the
data directory is the manager's only), signal or trace the manager, or read its environment;
Redis's ACL users separate it from the other bots' data. The manager can start a process as
another user when it is root or holds CAP_SETUID and CAP_SETGID, and it needs CAP_KILL to
stop such a process; without them every bot runs as the manager's user and only Redis
separates them (:data:`SHARED`, logged at start and shown by ``multibot status``).
"""

from __future__ import annotations

import grp
import importlib.util
import os
import pwd
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from manager.config import BotConfig, ManagerSettings
from manager.daemon.private_files import PRIVATE_UMASK, secure_data_dir
from manager.embedded.child_process import OsUser, first_closed_dir
from manager.embedded.postgres_server import server_user
from manager.errors import EmbeddedServiceError, ManagerError

log = structlog.get_logger("manager")

#: Logged at start (a warning) when bots run as the manager's own OS user.
SHARED = "bots share the manager's user: isolation is Redis-only"
#: The capabilities (bit numbers, <linux/capability.h>) a manager needs to run bots as others.
NEEDED_CAPABILITIES = {"CAP_SETUID": 7, "CAP_SETGID": 6, "CAP_KILL": 5}


class OsUserError(ManagerError):
    """A bot cannot run as the OS user its config names; the message says what to do."""


def missing_capabilities(status: str) -> list[str]:
    """Which of :data:`NEEDED_CAPABILITIES` the ``CapEff`` line of a ``/proc/<pid>/status``
    text lacks (all of them when there is no such line)."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split()[1], 16)
            return [name for name, bit in NEEDED_CAPABILITIES.items() if not effective >> bit & 1]
    return list(NEEDED_CAPABILITIES)


def switch_blockers() -> list[str]:
    """The capabilities this process lacks to run bots as other OS users (empty: it can)."""
    try:
        with open("/proc/self/status") as status:
            return missing_capabilities(status.read())
    except OSError:  # not Linux
        return list(NEEDED_CAPABILITIES)


def log_sharing(default_user: str, blockers: Sequence[str], fallback: str | None = None) -> None:
    """Say at start that bots share the manager's user, and what would give them their own
    (``fallback``: why the unset default ``bot_user`` could not be used)."""
    if fallback is not None:
        todo = fallback
    elif blockers:
        todo = (
            "run the manager as root, or with "
            f"{', '.join(blockers)} in its effective capabilities (systemd: "
            "AmbientCapabilities=CAP_SETUID CAP_SETGID CAP_KILL), to run bots as "
            "supervisor.bot_user"
        )
    else:
        todo = (
            "supervisor.bot_user is empty: set it to an OS user of the bots' own "
            "(`useradd --system --no-create-home multibot-bot`)"
        )
    log.warning(SHARED, todo=todo, missing=list(blockers) or None, bot_user=default_user or None)


_UNSET = "supervisor.bot_user is not set: bots share the manager's user"


class BotUsers:
    """The OS user each bot's processes run as, resolved at start and at every reload.

    ``switching``: whether the manager can run processes as other users. ``reserved``: uids
    a bot must never run as (root, the manager's own, the embedded PostgreSQL's), each with
    what it is. ``data_dir``: where bots must not start. ``explicit``: whether the operator
    set ``default_user``; the built-in default is only a preference: when that user does not
    exist or cannot start Python here (a developer's first ``multibot start`` as root), bots
    share the manager's user and :attr:`fallback` says why and what to do.
    """

    def __init__(
        self,
        default_user: str,
        *,
        switching: bool,
        reserved: Mapping[int, str],
        data_dir: Path,
        explicit: bool = True,
    ) -> None:
        self._default = default_user
        self._explicit = explicit
        self.fallback: str | None = None
        self._switching = switching
        self._reserved = dict(reserved)
        self._data_dir = data_dir
        self._users: dict[str, OsUser | None] = {}
        self._checked: set[OsUser] = set()

    def __repr__(self) -> str:
        return f"<BotUsers switching={self._switching} users={self.names()}>"

    @property
    def switching(self) -> bool:
        """Whether the manager can run bots as other OS users."""
        return self._switching

    def names(self) -> list[str]:
        """The OS users bots run as (``user:group`` where a group is set; with no bots, the
        fleet's default); empty: they share the manager's."""
        if not self._users:
            usable = self._switching and self._default and self.fallback is None
            return [self._default] if usable else []
        return sorted({_label(u) for u in self._users.values() if u is not None})

    def user(self, bot: BotConfig) -> OsUser | None:
        """The OS user of ``bot``'s processes; None: the manager's own."""
        return self._users.get(bot.id)

    def resolve(self, bots: Sequence[BotConfig]) -> None:
        """Look up every bot's OS user, or raise :class:`OsUserError` naming each problem
        (and nothing changes)."""
        users: dict[str, OsUser | None] = {}
        errors: list[str] = []
        fallback: str | None = None
        for index, bot in enumerate(bots):
            try:
                users[bot.id] = self._resolve(bot, index)
            except OsUserError as exc:
                if bot.user or self._explicit:
                    errors.append(str(exc))
                else:  # the built-in default, unusable here: share, and say so
                    users[bot.id] = None
                    fallback = f"{exc} ({_UNSET})"
        if not bots and self._switching and self._default and not self._explicit:
            try:  # no bot yet: whether the built-in default would serve the first one
                self._resolve(BotConfig.model_construct(id="-", entry="-", user="", group=""), 0)
            except OsUserError as exc:
                fallback = f"{exc} ({_UNSET})"
        if errors:
            listed = "\n  ".join(dict.fromkeys(errors))  # the default's, once
            raise OsUserError(f"cannot run the bots as their OS users:\n  {listed}")
        self._users = users
        self.fallback = fallback

    def _resolve(self, bot: BotConfig, index: int) -> OsUser | None:
        where = f"bots[{index}].user" if bot.user else "supervisor.bot_user"
        name = bot.user or (self._default if self._switching else "")
        if not self._switching and (bot.user or bot.group):
            key = f"bots[{index}].user" if bot.user else f"bots[{index}].group"
            raise OsUserError(
                f"{key}: running a bot as another OS user needs a manager that can switch "
                "users (root, or CAP_SETUID, CAP_SETGID and CAP_KILL): run it so, or remove "
                f"{key.rpartition('.')[2]}"
            )
        if not name:
            return None
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            shared = ' (or to "" to run bots as the manager\'s user)' if not bot.user else ""
            raise OsUserError(
                f"{where}: there is no OS user {name!r}: create it (`useradd --system "
                f"--no-create-home --shell /usr/sbin/nologin {name}`) or set {where} to an "
                f"existing user of the bots' own{shared}"
            ) from None
        gid = entry.pw_gid
        if bot.group:
            try:
                gid = grp.getgrnam(bot.group).gr_gid
            except KeyError:
                raise OsUserError(
                    f"bots[{index}].group: there is no OS group {bot.group!r}: create it "
                    f"(`groupadd --system {bot.group}`) or remove the setting"
                ) from None
            if gid == 0:
                raise OsUserError(
                    f"bots[{index}].group: {bot.group} is root's group, whose files a bot "
                    "must not read: name a group of the bots' own"
                )
        user = OsUser(entry.pw_name, entry.pw_uid, gid)
        if user.uid in self._reserved:
            raise OsUserError(
                f"{where}: {name} is {self._reserved[user.uid]}; a bot must not run as it: "
                "name an OS user of the bots' own"
            )
        if user not in self._checked:
            self._check_reach(user, where)
            self._checked.add(user)
        return user

    def _check_reach(self, user: OsUser, where: str) -> None:
        """Refuse a user who could not start Python here, or would start in the data dir."""
        cwd = Path.cwd()
        if cwd == self._data_dir or self._data_dir in cwd.parents:
            raise OsUserError(
                f"{where}: bots start in the manager's working directory {cwd}, which is in "
                f"data_dir: start the manager from another directory"
            )
        needed = [
            (Path(sys.executable), "the Python the bots run", False),
            (Path(os.__file__).parent, "its standard library", True),
            (Path(sysconfig.get_paths()["purelib"]), "its site-packages", True),
            (cwd, "the working directory bots start in", True),
        ]
        runtime = importlib.util.find_spec("bots")  # found, not imported
        if runtime is not None and runtime.origin is not None:
            needed.append((Path(runtime.origin).parent, "the bot runtime's code", True))
        for path, what, read in needed:
            blocked = first_closed_dir(path, user, read=read)
            if blocked is not None:
                info = blocked.stat()
                raise OsUserError(
                    f"{where}: bots run as {user.name}, who cannot reach {path} ({what}): "
                    f"{blocked} (mode {info.st_mode & 0o777:o}, uid {info.st_uid}) is closed "
                    f"to it. Install multibot and its Python where {user.name} can read "
                    f"them (under /opt, say), or open the way (`chmod o+rx {blocked}`)"
                )


def _label(user: OsUser) -> str:
    try:
        primary = pwd.getpwnam(user.name).pw_gid
    except KeyError:
        primary = user.gid
    if user.gid == primary:
        return user.name
    try:
        return f"{user.name}:{grp.getgrgid(user.gid).gr_name}"
    except KeyError:
        return f"{user.name}:{user.gid}"


def secure_and_resolve(settings: ManagerSettings) -> BotUsers:
    """Before anything starts: umask 077, a private data directory, and the OS users of
    the bots that may run here looked up (a missing one stops the start here, before the
    services); bots sharing the manager's user are logged, saying why."""
    os.umask(PRIVATE_UMASK)  # inherited by the embedded servers and the bots
    postgres_user = _embedded_postgres_user(settings)
    secure_data_dir(
        settings.data_dir,
        traversable=postgres_user is not None,
        others={settings.data_dir / "postgres": postgres_user.uid} if postgres_user else None,
    )
    blockers = switch_blockers()
    reserved = {0: "root"}
    reserved.setdefault(os.geteuid(), "the manager's own user")
    if postgres_user is not None:
        reserved.setdefault(postgres_user.uid, "the embedded PostgreSQL's user")
    users = BotUsers(
        settings.supervisor.bot_user,
        switching=not blockers,
        reserved=reserved,
        data_dir=settings.data_dir,
        explicit="bot_user" in settings.supervisor.model_fields_set,
    )
    users.resolve(settings.local_bots)
    if not users.names() or any(users.user(bot) is None for bot in settings.local_bots):
        log_sharing(settings.supervisor.bot_user, blockers, users.fallback)
    return users


def _embedded_postgres_user(settings: ManagerSettings) -> OsUser | None:
    """The OS user the embedded PostgreSQL will run as, if not ours (we are root)."""
    if settings.postgres_dsn is not None:
        return None
    try:
        return server_user(None)
    except EmbeddedServiceError:
        return None  # its start says what is missing
