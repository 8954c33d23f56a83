"""The OpenAI-compatible HTTP server: `app.create_app` over one engine behind `worker.Worker`."""
