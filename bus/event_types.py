"""The standard event types (from the design seed); their data schemas are in
:mod:`bus.catalog`.

Apart from the schemas, so a bot that names a type loads no pydantic (see
:mod:`bus.schemas`).
"""

from __future__ import annotations

import enum


class EventType(enum.StrEnum):
    """Standard event types; members are plain strings (``EventType.BOT_STARTED``)."""

    # Bot lifecycle (published by the manager on a bot's behalf)
    BOT_STARTED = "bot.lifecycle.started"
    BOT_STOPPED = "bot.lifecycle.stopped"
    BOT_ERROR = "bot.lifecycle.error"
    BOT_HEALTH_CHANGED = "bot.lifecycle.health_changed"
    BOT_OVERLOAD = "bot.overload"
    # User interactions
    MESSAGE_RECEIVED = "user.message.received"
    MESSAGE_SENT = "user.message.sent"
    CONVERSATION_STARTED = "user.conversation.started"
    CONVERSATION_ENDED = "user.conversation.ended"
    # Profiles
    PROFILE_CREATED = "profile.girl.created"
    PROFILE_UPDATED = "profile.girl.updated"
    PROFILE_DELETED = "profile.girl.deleted"
    # Multi-bot coordination
    SHARED_USER_DETECTED = "multibot.user.shared_detected"
    RESOURCE_CONFLICT = "multibot.resource.conflict"
    LOAD_BALANCE_REQUIRED = "multibot.load.balance_required"
    FAILOVER_TRIGGERED = "multibot.failover.triggered"
    # System
    MAINTENANCE_STARTED = "system.maintenance.started"
    MAINTENANCE_ENDED = "system.maintenance.ended"
    BACKUP_COMPLETED = "system.backup.completed"
    CONFIGURATION_UPDATED = "system.config.updated"
    SYSTEM_SHUTDOWN = "system.shutdown"
    MEMORY_PRESSURE = "system.memory.pressure"
    GROUP_IDLE = "system.group.idle"
    GROUP_REMOVED = "system.group.removed"
    REDIS_RESTORED = "system.redis.restored"
    ARCHIVE_STALLED = "system.archive.stalled"
    ARCHIVE_RESUMED = "system.archive.resumed"


#: Every standard type: the ones :mod:`bus.catalog` may hold a schema for.
STANDARD_TYPES: frozenset[str] = frozenset(EventType)
