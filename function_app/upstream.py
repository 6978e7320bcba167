"""Upstream systems: one Service Bus queue carries dataset-ready, retrain and score messages.

The contract is in :mod:`function_app.messages`. A valid message starts its orchestration once
(the instance id comes from the message's content and ``MessageId``, so a redelivery starts
nothing new). An invalid or unknown message is logged with the reason and the function raises:
with ``autoCompleteMessages`` the runtime then abandons the message, Service Bus redelivers it
until its delivery count reaches the queue's ``maxDeliveryCount``, and then moves it to the
dead-letter queue (reason ``MaxDeliveryCountExceeded``). It is never completed silently, never lost.

A message that must wait (its file still being copied into the lake) is neither: a copy of it is
scheduled on the queue for later (:mod:`function_app.waiting`) and the original completes, so a
long copy is waited for instead of exhausting the delivery count in seconds.
"""

from __future__ import annotations

import azure.durable_functions as df
import azure.functions as func

import asyncio

from function_app import waiting
from function_app.logging_context import RunLog
from function_app.messages import MessageError, TrainRequest, parse_upstream_message
from function_app.raw_files import NotReady
from function_app.runtime import load_settings
from function_app.starts import start_scoring, start_training
from shared.settings import SERVICEBUS_CONNECTION

bp = df.Blueprint()


@bp.service_bus_queue_trigger(
    arg_name="message", connection=SERVICEBUS_CONNECTION, queue_name="%MM_UPSTREAM_QUEUE%"
)
@bp.durable_client_input(client_name="client")
async def on_upstream_message(message: func.ServiceBusMessage, client: df.DurableOrchestrationClient) -> None:
    """Start the run an upstream message asks for; raise on a bad message so it is dead-lettered."""
    state = waiting.waiting_of(message)
    message_id = state.original_id  # a copy sent to wait keeps the identity of the message it copies
    log = RunLog({"message_id": message_id, "delivery_count": message.delivery_count, "waits": state.waits})
    try:
        parsed = parse_upstream_message(message.get_body())
        log = log.bind(type=parsed.type)
        if isinstance(parsed.request, TrainRequest):
            outcome = await start_training(
                client, parsed.request, log, dedupe=message_id, etag=parsed.etag, path_field="path"
            )
        else:
            outcome = await start_scoring(client, parsed.request, log, dedupe=message_id, path_field="path")
    except MessageError as exc:
        log.error("upstream message rejected", field=exc.field, reason=exc.reason)
        raise
    except NotReady as exc:  # transient: a copy is scheduled for later, this one completes
        if state.waits >= waiting.MAX_WAITS:
            log.error("raw file still not complete after the longest wait; the message is dead-lettered",
                      reason=str(exc))
            raise
        settings = load_settings()
        after, when = await asyncio.to_thread(waiting.send_later, message, settings.upstream_queue, settings)
        log.warning("raw file not complete yet; the message is sent again later", reason=str(exc),
                    waits=after.waits, at=when.isoformat(timespec="seconds"))
        return
    log.info("upstream message accepted", instance_id=outcome.instance_id, started=outcome.started)
