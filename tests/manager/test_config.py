"""Tests for manager.config: the TOML file, its environment overrides and its error list."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bus.settings import BusSettings
from manager.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    ConfigError,
    ManagerSettings,
    config_path,
    load_config,
)

CHECKOUT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``MULTIBOT_*`` variable of the calling shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("MULTIBOT_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "multibot.toml") -> Path:
    """Write ``text`` as a config file in tmp_path; its path."""
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_of(path: Path) -> list[str]:
    """The errors load_config lists for ``path`` (fails the test if it loads)."""
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == str(path)
    return caught.value.errors


MINIMAL = """
[[bots]]
id = "a"
entry = "bots.chatbot:main"
"""


class TestCheckoutConfig:
    def test_example_config_loads(self) -> None:
        """The checkout's config/multibot.toml is valid: three bots, a 2 GiB budget."""
        settings = load_config(DEFAULT_CONFIG_PATH)
        assert [bot.id for bot in settings.bots] == ["greeter", "matcher", "shared-users"]
        assert settings.coordinator.memory.budget == 2 * 1024**3
        assert settings.bot("shared-users").standby
        assert settings.bot("matcher").replicas == 2

    def test_example_data_dir_is_relative_to_the_file(self) -> None:
        """The example's data_dir "../data" means the checkout's data/, wherever we run."""
        settings = load_config(DEFAULT_CONFIG_PATH)
        assert settings.data_dir == CHECKOUT / "data"
        assert settings.data_dir.is_absolute()

    def test_default_path_is_the_checkouts_config(self) -> None:
        """DEFAULT_CONFIG_PATH points at config/multibot.toml of this checkout."""
        assert DEFAULT_CONFIG_PATH == CHECKOUT / "config" / "multibot.toml"


class TestLoading:
    def test_relative_data_dir_is_resolved_against_the_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A relative data_dir is taken from the config file's directory, not the cwd."""
        (tmp_path / "etc").mkdir()
        path = write(tmp_path / "etc", 'data_dir = "sub/../state"\n')
        monkeypatch.chdir("/")
        assert load_config(path).data_dir == tmp_path / "etc" / "state"

    def test_absolute_data_dir_is_kept(self, tmp_path: Path) -> None:
        """An absolute data_dir is used as written."""
        path = write(tmp_path, f'data_dir = "{tmp_path / "elsewhere"}"\n')
        assert load_config(path).data_dir == tmp_path / "elsewhere"

    def test_empty_file_gives_the_defaults(self, tmp_path: Path) -> None:
        """An empty file is a valid config with no bots and the documented defaults."""
        settings = load_config(write(tmp_path, ""))
        assert settings.bots == []
        assert settings.namespace == "multibot"
        assert settings.redis_url is None

    def test_default_data_dir_is_next_to_the_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A file without data_dir means the data/ directory next to that file."""
        monkeypatch.chdir("/")
        assert load_config(write(tmp_path, "")).data_dir == tmp_path / "data"

    def test_entry_without_function_gets_main(self, tmp_path: Path) -> None:
        """An entry naming only a module means its ``main``."""
        path = write(tmp_path, '[[bots]]\nid = "a"\nentry = "bots.chatbot"\n')
        assert load_config(path).bot("a").entry == "bots.chatbot:main"

    def test_entry_with_function_is_kept(self, tmp_path: Path) -> None:
        """An entry naming its function is used as written."""
        path = write(tmp_path, '[[bots]]\nid = "a"\nentry = "pkg.mod:run"\n')
        assert load_config(path).bot("a").entry == "pkg.mod:run"

    def test_memory_sizes_take_units(self, tmp_path: Path) -> None:
        """Sizes are written with units ("256MiB", "1GB") and read as bytes."""
        path = write(
            tmp_path,
            '[coordinator.memory]\nbudget = "1GB"\n'
            '[[bots]]\nid = "a"\nentry = "m"\nmemory_limit = "256MiB"\n',
        )
        settings = load_config(path)
        assert settings.coordinator.memory.budget == 10**9
        assert settings.bot("a").memory_limit == 256 * 1024**2

    def test_settings_are_frozen(self, tmp_path: Path) -> None:
        """Loaded settings cannot be changed after validation."""
        settings: ManagerSettings = load_config(write(tmp_path, MINIMAL))
        with pytest.raises(ValueError, match="frozen"):
            settings.namespace = "other"  # type: ignore[misc]

    def test_unknown_bot_is_a_key_error(self, tmp_path: Path) -> None:
        """bot() of an id not in the config raises KeyError."""
        settings = load_config(write(tmp_path, MINIMAL))
        with pytest.raises(KeyError):
            settings.bot("nope")


class TestEnvironment:
    def test_environment_overrides_the_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A MULTIBOT_<NAME> variable wins over the file's value."""
        monkeypatch.setenv("MULTIBOT_NAMESPACE", "staging")
        monkeypatch.setenv("MULTIBOT_REDIS_URL", "redis://example:6380/1")
        path = write(tmp_path, 'namespace = "prod"\n')
        settings = load_config(path)
        assert settings.namespace == "staging"
        assert settings.redis_url == "redis://example:6380/1"

    def test_nested_override_keeps_the_sections_other_keys(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """MULTIBOT_SECTION__KEY overrides one key; the file's other keys there stay."""
        monkeypatch.setenv("MULTIBOT_COORDINATOR__LAG_THRESHOLD", "5000")
        monkeypatch.setenv("MULTIBOT_COORDINATOR__MEMORY__HIGH", "0.95")
        path = write(
            tmp_path, "[coordinator]\ninterval = 7.0\n[coordinator.memory]\nbudget = '1GiB'\n"
        )
        coordinator = load_config(path).coordinator
        assert coordinator.lag_threshold == 5000
        assert coordinator.interval == 7.0
        assert coordinator.memory.high == 0.95
        assert coordinator.memory.budget == 1024**3

    def test_bad_environment_value_names_its_variable(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An invalid value from the environment is listed with the variable it came from."""
        monkeypatch.setenv("MULTIBOT_API__PORT", "99999")
        (error,) = errors_of(write(tmp_path, ""))
        assert error.startswith("api.port: ")
        assert "(from the environment: MULTIBOT_API__PORT)" in error

    def test_config_variable_is_not_a_setting(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """MULTIBOT_CONFIG (which names the file) is not refused as an unknown setting."""
        monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "other.toml"))
        assert load_config(write(tmp_path, MINIMAL)).bot("a").id == "a"


class TestErrors:
    def test_toml_syntax_error_is_reported(self, tmp_path: Path) -> None:
        """A file that is not TOML is one error saying so, with where it broke."""
        path = write(tmp_path, "namespace = \n")
        (error,) = errors_of(path)
        assert error.startswith("not valid TOML: ")
        assert "line 1" in error

    def test_missing_file_says_to_pass_config(self, tmp_path: Path) -> None:
        """A file that cannot be read is reported with how to name another."""
        path = tmp_path / "absent.toml"
        (error,) = errors_of(path)
        assert "cannot read it: No such file or directory" in error
        assert "--config" in error
        assert CONFIG_ENV in error

    def test_message_lists_errors_and_counts_them(self, tmp_path: Path) -> None:
        """The exception's text names the file, counts the errors and lists each."""
        with pytest.raises(ConfigError) as caught:
            load_config(write(tmp_path, 'colour = "blue"\nshape = 1\n'))
        message = str(caught.value)
        assert message.startswith(f"{tmp_path / 'multibot.toml'} is invalid (2 errors):\n")
        assert "  colour: unknown setting" in message
        assert "  shape: unknown setting" in message
        assert "`multibot config check`" in message

    def test_a_fill_wait_another_archiver_would_take_for_death_is_refused(
        self, tmp_path: Path
    ) -> None:
        """Events held for a full block longer than half of claim_idle would be taken
        over by another archiver: the config says so instead of starting."""
        path = write(tmp_path, "[archive]\nfill_wait = 40.0\nclaim_idle = 60.0\n")
        (error,) = errors_of(path)
        assert "fill_wait must be at most half of claim_idle" in error
        assert load_config(write(tmp_path, "[archive]\nfill_wait = 30.0\n")).archive.fill_wait == 30
        short = load_config(write(tmp_path, "[archive]\nclaim_idle = 1.0\n")).archive
        assert short.held_for_blocks == 0.5  # the default fill_wait gives way

    def test_one_error_is_singular(self, tmp_path: Path) -> None:
        """A single problem is counted as "1 error"."""
        with pytest.raises(ConfigError, match=r"is invalid \(1 error\):"):
            load_config(write(tmp_path, 'colour = "blue"\n'))

    def test_every_error_is_listed_by_its_path(self, tmp_path: Path) -> None:
        """One load lists every problem of the file, each prefixed with its path in it."""
        path = write(
            tmp_path,
            """
            colour = "blue"
            [supervisor]
            heartbeat_interval = 5.0
            heartbeat_timeout = 10.0
            [coordinator.memory]
            low = 0.95
            high = 0.9
            [[bots]]
            id = "Bad Id"
            entry = "bots/chatbot.py"
            [[bots]]
            id = "ok"
            entry = "bots.chatbot"
            memory_limit = "lots"
            restart = { policy = "sometimes" }
            subscriptions = [{ pattern = "user..x" }]
            [[bots]]
            id = "ok"
            entry = "bots.chatbot:main"
            [[bots]]
            id = "lonely"
            entry = "bots.chatbot:main"
            standby = true
            """,
        )
        errors = errors_of(path)
        by_path = {e.partition(": ")[0]: e.partition(": ")[2] for e in errors}
        assert len(errors) == len(by_path) == 10, errors
        assert by_path["colour"].startswith("unknown setting")
        assert "'Bad Id' is not a bot id" in by_path["bots[0].id"]
        assert "is not an entry point" in by_path["bots[0].entry"]
        assert "(got 'lots')" in by_path["bots[1].memory_limit"]
        assert "'sometimes'" in by_path["bots[1].restart.policy"]
        assert "bad pattern 'user..x'" in by_path["bots[1].subscriptions[0].pattern"]
        assert by_path["bots[2].id"] == "'ok' is already the id of bots[1]"
        assert "needs replicas >= 2" in by_path["bots[3]"]
        assert "more than twice heartbeat_interval" in by_path["supervisor"]
        assert by_path["coordinator.memory"] == "low must be <= high"

    def test_duplicate_id_in_an_otherwise_valid_file(self, tmp_path: Path) -> None:
        """Two bots with one id are listed once, naming both positions."""
        path = write(tmp_path, MINIMAL + MINIMAL)
        assert errors_of(path) == ["bots[1].id: 'a' is already the id of bots[0]"]

    def test_multibot_environment_keys_are_refused(self, tmp_path: Path) -> None:
        """A bot's environment may not set the manager's own MULTIBOT_* variables."""
        path = write(tmp_path, MINIMAL + 'environment = { MULTIBOT_NAMESPACE = "x", OK = "1" }\n')
        (error,) = errors_of(path)
        assert error.startswith("bots[0].environment: MULTIBOT_NAMESPACE: ")
        assert "manager's own" in error

    def test_other_environment_keys_are_kept(self, tmp_path: Path) -> None:
        """Ordinary environment variables of a bot are passed through."""
        path = write(tmp_path, MINIMAL + 'environment = { API_KEY = "k" }\n')
        assert load_config(path).bot("a").environment == {"API_KEY": "k"}

    def test_heartbeat_timeout_exactly_twice_the_interval_is_refused(self, tmp_path: Path) -> None:
        """heartbeat_timeout must be strictly more than twice heartbeat_interval."""
        path = write(tmp_path, "[supervisor]\nheartbeat_interval = 2.0\nheartbeat_timeout = 4.0\n")
        (error,) = errors_of(path)
        assert error.startswith("supervisor: heartbeat_timeout must be more than twice")
        ok = write(tmp_path, "[supervisor]\nheartbeat_interval = 2.0\nheartbeat_timeout = 4.1\n")
        assert load_config(ok).supervisor.heartbeat_timeout == 4.1

    def test_low_equal_to_high_is_allowed(self, tmp_path: Path) -> None:
        """The memory alert's clear line may equal its raise line."""
        path = write(tmp_path, "[coordinator.memory]\nlow = 0.9\nhigh = 0.9\n")
        assert load_config(path).coordinator.memory.low == 0.9

    def test_standby_with_two_replicas_is_valid(self, tmp_path: Path) -> None:
        """standby with replicas >= 2 loads."""
        path = write(tmp_path, MINIMAL + "replicas = 2\nstandby = true\n")
        assert load_config(path).bot("a").standby

    def test_backoff_cap_below_base_is_refused(self, tmp_path: Path) -> None:
        """A restart policy whose cap is below its base is an error at its path."""
        path = write(tmp_path, MINIMAL + "restart = { backoff_base = 5.0, backoff_cap = 1.0 }\n")
        assert errors_of(path) == ["bots[0].restart: backoff_cap must be >= backoff_base"]

    def test_redis_appendfsync_with_a_redis_url_is_refused(self, tmp_path: Path) -> None:
        """The AOF setting is the embedded redis-server's: with redis_url there is none."""
        path = write(tmp_path, 'redis_url = "redis://h:1/0"\nredis_appendfsync = "always"\n')
        (error,) = errors_of(path)
        assert error.startswith("redis_appendfsync: sets the embedded redis-server")
        assert "appendfsync in that Redis's own configuration" in error
        assert load_config(write(tmp_path, 'redis_appendfsync = "always"\n')).redis_appendfsync
        (error,) = errors_of(write(tmp_path, 'redis_appendfsync = "no"\n'))
        assert error.startswith("redis_appendfsync: Input should be 'always' or 'everysec'")

    def test_bad_redis_url_is_refused(self, tmp_path: Path) -> None:
        """redis_url must be a URL the bus reads (redis://, rediss://, unix://, Sentinel)."""
        (error,) = errors_of(write(tmp_path, 'redis_url = "http://localhost"\n'))
        assert error.startswith("redis_url: must start with redis://")


class TestBusSettings:
    def test_bus_settings_build_valid_bus_settings(self, tmp_path: Path) -> None:
        """bus_settings() gives BusSettings fields: the URL, namespace and [bus] options."""
        path = write(
            tmp_path,
            'namespace = "ns"\n[bus]\nroutes = { user = "people" }\nmax_event_bytes = 4096\n'
            "[bus.consumer]\nconcurrency = 4\n",
        )
        fields = load_config(path).bus_settings("redis://h:1/0")
        bus = BusSettings.model_validate(fields)
        assert bus.redis_url == "redis://h:1/0"
        assert bus.namespace == "ns"
        assert bus.routes == {"user": "people"}
        assert bus.max_event_bytes == 4096
        assert bus.consumer.concurrency == 4

    def test_unset_options_keep_the_bus_defaults(self, tmp_path: Path) -> None:
        """Options left out of [bus] are not passed, so BusSettings' defaults apply."""
        fields = load_config(write(tmp_path, "")).bus_settings("redis://h")
        assert "routes" not in fields
        assert "default_stream" not in fields
        assert BusSettings.model_validate(fields).routes == BusSettings().routes

    def test_invalid_bus_option_is_refused_at_load(self, tmp_path: Path) -> None:
        """A [bus] value BusSettings would refuse is refused when the config loads."""
        errors = errors_of(write(tmp_path, "[bus]\nmax_event_bytes = 10\n"))
        assert len(errors) == 1
        assert "max_event_bytes" in errors[0]


class TestConfigPath:
    def test_given_path_wins(self, tmp_path: Path) -> None:
        """--config wins over MULTIBOT_CONFIG."""
        given = tmp_path / "given.toml"
        assert config_path(given, {CONFIG_ENV: str(tmp_path / "env.toml")}) == given

    def test_environment_wins_over_default(self, tmp_path: Path) -> None:
        """With no --config, MULTIBOT_CONFIG names the file."""
        env = tmp_path / "env.toml"
        assert config_path(None, {CONFIG_ENV: str(env)}) == env

    def test_default_when_neither_is_set(self) -> None:
        """With neither (or an empty MULTIBOT_CONFIG), the checkout's default is used."""
        assert config_path(None, {}) == DEFAULT_CONFIG_PATH
        assert config_path(None, {CONFIG_ENV: ""}) == DEFAULT_CONFIG_PATH
