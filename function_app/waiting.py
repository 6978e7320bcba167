"""A Service Bus message that must wait (its file still being copied) is sent again later, not failed.

Raising would abandon the message, and Service Bus redelivers an abandoned message at once: with
``maxDeliveryCount`` 5 and about a second per delivery, a copy that takes more than a few seconds
would end in the dead-letter queue, where nothing replays it. Instead the function schedules a copy
of the message on the same queue (``ScheduledEnqueueTimeUtc``, backing off 30 s, 60 s, ... up to
15 min) and returns, so the original completes. The copy carries the original ``MessageId`` in an
application property (the run it starts has the original's identity) and how many times it
waited; after ``MAX_WAITS`` it is failed as a message would be (dead-lettered, reason logged).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import azure.functions as func

ORIGINAL_ID = "mm_original_message_id"
WAITS = "mm_waits"
MAX_WAITS = 12  # 30 s doubling to 15 min: about 1 h 50 min in all
FIRST_DELAY = 30.0
LONGEST_DELAY = 900.0


@dataclass(frozen=True)
class Waiting:
    """Where a message stands: its original id and how many times it has waited already."""

    original_id: str | None
    waits: int

    @property
    def delay(self) -> float:
        """Seconds before the next delivery of this message."""
        return min(FIRST_DELAY * 2 ** self.waits, LONGEST_DELAY)


def waiting_of(message: func.ServiceBusMessage) -> Waiting:
    """The original id and wait count a message carries (a first delivery: its own id, 0)."""
    props = dict(getattr(message, "application_properties", None) or {})
    original = props.get(ORIGINAL_ID)
    try:
        waits = max(int(props.get(WAITS, 0)), 0)
    except (TypeError, ValueError):
        waits = 0
    return Waiting(str(original) if original else (message.message_id or None), waits)


def later_copy(message: func.ServiceBusMessage, waiting: Waiting, now: datetime) -> tuple[Any, datetime]:
    """The SDK message to schedule, and when: the same body, one more wait, the original's id."""
    from azure.servicebus import ServiceBusMessage

    count = waiting.waits + 1
    copy = ServiceBusMessage(
        message.get_body(),
        content_type=message.content_type,
        message_id=f"{waiting.original_id or 'message'}~wait{count}",
        application_properties={ORIGINAL_ID: waiting.original_id or "", WAITS: count},
    )
    return copy, now + timedelta(seconds=waiting.delay)


def default_sender_factory(settings: Any) -> Callable[[str], Any]:
    """A queue sender of the app's Service Bus: its managed identity in Azure, a connection string
    locally (the same settings the trigger's ``ServiceBusConnection`` reads)."""
    from azure.servicebus import ServiceBusClient

    def open_sender(queue: str) -> Any:
        if settings.servicebus_connection_string:
            client = ServiceBusClient.from_connection_string(settings.servicebus_connection_string)
        else:
            from azure.identity import ManagedIdentityCredential

            if not settings.servicebus_namespace:
                raise RuntimeError("ServiceBusConnection__fullyQualifiedNamespace is not set: cannot send "
                                   "the message again later")
            credential = ManagedIdentityCredential(client_id=settings.servicebus_client_id) \
                if settings.servicebus_client_id else ManagedIdentityCredential()
            client = ServiceBusClient(settings.servicebus_namespace, credential)
        return _ClosingSender(client, client.get_queue_sender(queue))

    return open_sender


class _ClosingSender:
    """A queue sender that closes its client with it (one message per use)."""

    def __init__(self, client: Any, sender: Any) -> None:
        self._client, self._sender = client, sender

    def schedule_messages(self, messages: Any, schedule_time_utc: datetime) -> Any:
        return self._sender.schedule_messages(messages, schedule_time_utc)

    def close(self) -> None:
        self._sender.close()
        self._client.close()


# tests replace it (the network edge); everything else runs for real
SENDER_FACTORY: Callable[[Any], Callable[[str], Any]] = default_sender_factory


def send_later(message: func.ServiceBusMessage, queue: str, settings: Any,
               now: datetime | None = None) -> tuple[Waiting, datetime]:
    """Blocking: schedule the message's copy on ``queue``; returns the new wait state and when."""
    waiting = waiting_of(message)
    copy, when = later_copy(message, waiting, now or datetime.now(timezone.utc))
    sender = SENDER_FACTORY(settings)(queue)
    try:
        sender.schedule_messages(copy, when)
    finally:
        sender.close()
    return Waiting(waiting.original_id, waiting.waits + 1), when
