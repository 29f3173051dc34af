"""agentloop.serve.http: the HTTP edge.

`app.create_app` builds the FastAPI app around the parts that serve/compose.py
builds; routes parse, call a service and convert (`admin`, `feedback`, `ui` and the
OpenAI routes in `app`). `access` is the /v1 middleware (keys, limits), `auth` who
is calling, `api_schema` the OpenAPI description of the bodies read by hand, and
`ui/` the pages and their assets. Domain errors (serve/errors.py) become
OpenAI-shaped HTTP responses here and nowhere else. Never imports torch or vllm.
"""
