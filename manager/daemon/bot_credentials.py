"""One password per bot for the whole deployment.

Each manager sets a bot's Redis users (:mod:`.redis_acl`) with ``reset`` and one password;
two managers running replicas of one bot (:mod:`.placement`) must set the same one, or each
would lock the other's processes out at their next login. The first manager to provision a
bot stores a fresh password at ``<ns>:credentials:{<bot>}`` (``SET NX``) and every manager
uses what is stored there. Only the admin user reaches the key (no bot user's key pattern
covers it); whoever holds the admin login can set any user's password anyway. After Redis
lost its data a manager stores the password it knows again, so running bots keep theirs.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from bus.keys import Keys


def credentials_key(keys: Keys, bot_id: str) -> str:
    """Where the bot's password is kept (its hash tag is the bot's)."""
    return f"{keys.namespace}:credentials:{{{bot_id}}}"


async def shared_password(admin: Redis, keys: Keys, bot_id: str, candidate: str) -> str:
    """The deployment's password of the bot: ``candidate`` unless one is stored already."""
    key = credentials_key(keys, bot_id)
    await admin.set(key, candidate, nx=True)
    stored: Any = await admin.get(key)
    if not stored:
        return candidate
    return stored.decode() if isinstance(stored, bytes) else str(stored)


async def forget_password(admin: Redis, keys: Keys, bot_id: str) -> None:
    """Drop the bot's password (the bot left the config)."""
    await admin.delete(credentials_key(keys, bot_id))
