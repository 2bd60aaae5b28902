"""A chat bot that shares users with other bots by the seed's rule: smallest bot id leads.

One module serves every chat bot (``greeter``, ``matcher``): it reads its id from
``bus.bot_id``. It

- answers ``user.message.received`` addressed to it with ``user.message.sent``;
- on ``multibot.user.shared_detected`` naming it, takes the primary role for that user if
  its id is the smallest of the bots named, else the secondary one, and announces it with
  ``multibot.user.role_assigned``;
- as a secondary, answers that user no more: it passes each of the user's messages to the
  primary with ``multibot.user.handover``, and the primary answers instead;
- on ``multibot.load.balance_required`` naming another bot, offers help with
  ``multibot.load.offer``.

Roles live in Redis (one key per bot and user, expiring after :data:`ROLE_TTL`), so
replicas of a bot, which share its consumer group and so each see only part of the
events, agree on them, and memory stays bounded.
"""

from __future__ import annotations

import enum

import structlog
from pydantic import BaseModel, ConfigDict

from bus import (
    BusClient,
    Event,
    EventType,
    LoadBalanceRequired,
    SchemaRegistry,
    SharedUserDetected,
    UserMessage,
)

log = structlog.get_logger("bots.chatbot")

ROLE_ASSIGNED = "multibot.user.role_assigned"
HANDOVER = "multibot.user.handover"
LOAD_OFFER = "multibot.load.offer"
#: Seconds a bot remembers its role for a user (renewed by each new announcement).
ROLE_TTL = 3600
_OPENERS = {
    "greeter": "Hello {user}, welcome!",
    "matcher": "Let me find you a match, {user}.",
}


class Role(enum.StrEnum):
    """A bot's role towards a user it shares with other bots."""

    #: Answers the user, including the messages the secondaries pass on.
    PRIMARY = "primary"
    #: Passes the user's messages to the primary instead of answering.
    SECONDARY = "secondary"


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoleAssigned(_Schema):
    """``multibot.user.role_assigned``: ``bot_id`` took ``role`` for the user."""

    user_id: str | int
    bot_id: str
    role: Role
    primary: str


class Handover(_Schema):
    """``multibot.user.handover``: a secondary passes a user's message to the primary."""

    user_id: str | int
    from_bot: str
    to_bot: str
    text: str = ""


class LoadOffer(_Schema):
    """``multibot.load.offer``: ``from_bot`` offers to take work off ``to_bot``."""

    from_bot: str
    to_bot: str
    reason: str | None = None


SCHEMAS: dict[str, type[BaseModel]] = {
    ROLE_ASSIGNED: RoleAssigned,
    HANDOVER: Handover,
    LOAD_OFFER: LoadOffer,
}


def register_schemas(registry: SchemaRegistry) -> None:
    """Declare the data schemas of the events chat bots publish."""
    for type_, model in SCHEMAS.items():
        registry.register(type_, model)


def answer(bot_id: str, user_id: str | int, text: str, passed_by: str | None = None) -> str:
    """What ``bot_id`` says back to a user's ``text`` (passed on by another bot or not)."""
    opener = _OPENERS.get(bot_id, "{bot} here, {user}.").format(bot=bot_id, user=user_id)
    heard = f"{passed_by} passed on" if passed_by else "you said"
    return f"{opener} ({heard}: {text})"


class ChatBot:
    """The subscriptions and handlers of one chat bot on its bus client."""

    def __init__(self, bus: BusClient) -> None:
        self.bus = bus
        self._log = log.bind(bot_id=bus.bot_id)

    def install(self) -> None:
        """Register the schemas and subscribe the handlers (before ``bus.run()``)."""
        bus, me = self.bus, self.bus.bot_id
        register_schemas(bus.schemas)
        bus.subscribe(
            EventType.MESSAGE_RECEIVED, self.on_message, where={"bot_id": me}, model=UserMessage
        )
        bus.subscribe(
            EventType.SHARED_USER_DETECTED,
            self.on_shared,
            where={"bot_ids": {"contains": me}},
            model=SharedUserDetected,
        )
        bus.subscribe(HANDOVER, self.on_handover, where={"to_bot": me}, model=Handover)
        bus.subscribe(
            EventType.LOAD_BALANCE_REQUIRED,
            self.on_balance_required,
            where={"bot_id": {"exists": True, "ne": me}},
            model=LoadBalanceRequired,
        )

    def _role_key(self, user_id: str | int) -> str:
        """The Redis key holding the primary bot of a user shared with this bot."""
        return self.bus.keys.bot_state(self.bus.bot_id, "role", user_id)

    async def _reply(self, user_id: str | int, text: str) -> None:
        data = {"user_id": user_id, "bot_id": self.bus.bot_id, "text": text}
        await self.bus.publish(EventType.MESSAGE_SENT, data, key=str(user_id))

    async def on_message(self, event: Event, msg: UserMessage) -> None:
        """Answer the user, or pass the message to the primary if this bot is secondary."""
        primary = await self.bus.redis.get(self._role_key(msg.user_id))
        if primary is None or primary == self.bus.bot_id:
            await self._reply(msg.user_id, answer(self.bus.bot_id, msg.user_id, msg.text))
            return
        handover = {
            "user_id": msg.user_id,
            "from_bot": self.bus.bot_id,
            "to_bot": primary,
            "text": msg.text,
        }
        await self.bus.publish(HANDOVER, handover, key=str(msg.user_id))
        self._log.info("message handed over", user_id=msg.user_id, to_bot=primary)

    async def on_shared(self, event: Event, shared: SharedUserDetected) -> None:
        """Take the primary role if this bot's id is the smallest named, else the secondary."""
        primary = min(shared.bot_ids)
        role = Role.PRIMARY if primary == self.bus.bot_id else Role.SECONDARY
        await self.bus.redis.set(self._role_key(shared.user_id), primary, ex=ROLE_TTL)
        assigned = {
            "user_id": shared.user_id,
            "bot_id": self.bus.bot_id,
            "role": role.value,
            "primary": primary,
        }
        await self.bus.publish(ROLE_ASSIGNED, assigned, key=str(shared.user_id))
        self._log.info("role taken", user_id=shared.user_id, role=str(role), primary=primary)

    async def on_handover(self, event: Event, handover: Handover) -> None:
        """Answer a message a secondary passed on."""
        text = answer(self.bus.bot_id, handover.user_id, handover.text, handover.from_bot)
        await self._reply(handover.user_id, text)

    async def on_balance_required(self, event: Event, need: LoadBalanceRequired) -> None:
        """Offer to take work off the bot that needs it."""
        assert need.bot_id is not None  # the subscription's where= asks for it
        offer = {"from_bot": self.bus.bot_id, "to_bot": need.bot_id, "reason": need.reason}
        await self.bus.publish(LOAD_OFFER, offer, key=need.bot_id)
        self._log.info("load offered", to_bot=need.bot_id, reason=need.reason)

    def __repr__(self) -> str:
        return f"<ChatBot {self.bus.bot_id} on {self.bus!r}>"


async def main(bus: BusClient) -> None:
    """Run a chat bot named ``bus.bot_id`` until the bus client is stopped."""
    ChatBot(bus).install()
    await bus.run()
