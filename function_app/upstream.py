"""Upstream systems: one Service Bus queue carries dataset-ready, retrain and score messages.

The contract is in :mod:`function_app.messages`. A valid message starts its orchestration once
(the instance id comes from the message's content and ``MessageId``, so a redelivery starts
nothing new). An invalid or unknown message is logged with the reason and the function raises:
with ``autoCompleteMessages`` the runtime then abandons the message, Service Bus redelivers it
until its delivery count reaches the queue's ``maxDeliveryCount``, and then moves it to the
dead-letter queue (reason ``MaxDeliveryCountExceeded``). It is never completed silently, never lost.
"""

from __future__ import annotations

import azure.durable_functions as df
import azure.functions as func

from function_app.logging_context import RunLog
from function_app.messages import MessageError, TrainRequest, parse_upstream_message
from function_app.raw_files import NotReady
from function_app.starts import start_scoring, start_training
from shared.settings import SERVICEBUS_CONNECTION

bp = df.Blueprint()


@bp.service_bus_queue_trigger(
    arg_name="message", connection=SERVICEBUS_CONNECTION, queue_name="%MM_UPSTREAM_QUEUE%"
)
@bp.durable_client_input(client_name="client")
async def on_upstream_message(message: func.ServiceBusMessage, client: df.DurableOrchestrationClient) -> None:
    """Start the run an upstream message asks for; raise on a bad message so it is dead-lettered."""
    message_id = message.message_id or None
    log = RunLog({"message_id": message_id, "delivery_count": message.delivery_count})
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
    except NotReady as exc:  # transient: abandoned, so Service Bus delivers it again
        log.warning("raw file not complete yet; the message will be delivered again", reason=str(exc))
        raise
    log.info("upstream message accepted", instance_id=outcome.instance_id, started=outcome.started)
