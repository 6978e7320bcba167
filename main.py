"""Entry module of the Functions app: the Python worker imports it and indexes ``app``.

The worker imports the module named by the ``PYTHON_SCRIPT_FILE_NAME`` app setting (default
``function_app.py``) and looks for exactly one top-level ``FunctionApp``. A ``function_app.py``
beside the ``function_app/`` package cannot work (the package wins the import and holds no app),
so the entry is ``main.py`` with ``PYTHON_SCRIPT_FILE_NAME=main.py`` — set in
``local.settings.json.template`` and in the Bicep app settings. This module only registers blueprints.
"""

import azure.durable_functions as df
import azure.functions as func

from function_app import http_api, ingestion, promotion, scoring, serving, training, upstream

app = df.DFApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(ingestion.bp)
app.register_functions(training.bp)
app.register_functions(promotion.bp)
app.register_functions(scoring.bp)
app.register_functions(http_api.bp)
app.register_functions(upstream.bp)
app.register_functions(serving.bp)
