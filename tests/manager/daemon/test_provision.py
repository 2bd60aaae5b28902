"""Tests for manager.daemon.provision: what a bot process's environment holds."""

from __future__ import annotations

import pwd

from manager.daemon.provision import bot_environment
from manager.embedded.child_process import OsUser

#: A manager's environment as systemd or a shell gives it, secrets included.
MANAGER_ENVIRON = {
    "PATH": "/usr/local/bin:/usr/bin",
    "LANG": "C.UTF-8",
    "LC_TIME": "en_GB.UTF-8",
    "TZ": "UTC",
    "PYTHONPATH": "/srv/bots",
    "PYTHONUNBUFFERED": "1",
    "HOME": "/root",
    "USER": "root",
    "MULTIBOT_POSTGRES_DSN": "postgresql://multibot:pw@db/multibot",
    "NOTIFY_SOCKET": "/run/systemd/notify",
    "WATCHDOG_USEC": "30000000",
    "CRM_TOKEN": "api-token-given-by-token_env",
    "AWS_SECRET_ACCESS_KEY": "k",
    "PYTHONSTARTUP": "/root/.pythonrc",
    "SSH_AUTH_SOCK": "/tmp/ssh-x/agent.1",
}


class TestBotEnvironment:
    def test_only_the_allow_list_the_users_identity_and_its_own(self) -> None:
        """Nothing of the manager's environment passes but what Python needs; HOME, USER
        and LOGNAME are the bot user's; the bot's own variables win."""
        user = OsUser.current()
        own = {"API_KEY": "the-bots-own", "LANG": "de_DE.UTF-8"}
        environment = bot_environment(MANAGER_ENVIRON, user, own)
        assert environment == {
            "PATH": "/usr/local/bin:/usr/bin",
            "LANG": "de_DE.UTF-8",
            "LC_TIME": "en_GB.UTF-8",
            "TZ": "UTC",
            "PYTHONPATH": "/srv/bots",
            "PYTHONUNBUFFERED": "1",
            "HOME": pwd.getpwuid(user.uid).pw_dir,
            "USER": user.name,
            "LOGNAME": user.name,
            "API_KEY": "the-bots-own",
        }

    def test_identity_of_another_user(self) -> None:
        """A bot under another OS user gets that user's name and home, not the manager's."""
        other = next(p for p in pwd.getpwall() if p.pw_uid != OsUser.current().uid)
        user = OsUser(other.pw_name, other.pw_uid, other.pw_gid)
        environment = bot_environment(MANAGER_ENVIRON, user, {})
        assert environment["USER"] == environment["LOGNAME"] == other.pw_name
        assert environment["HOME"] == other.pw_dir
