"""The Azure Functions app: thin adapters from triggers to the core's pipeline stages.

One blueprint per concern — ``ingestion`` (lake events), ``training``, ``promotion``, ``scoring``,
``http_api`` (starts, status; serving routes join it) and ``upstream`` (Service Bus messages) —
registered by the entry module ``main.py`` at the app root. The package never reads settings at
import time; :mod:`shared.settings` is read when a function runs.
"""
