"""agentloop.serve.store: everything agentloop persists, and all of its SQL.

One synchronous SQLAlchemy Core `Store` (SQLite by default, PostgreSQL by URL)
assembled from one module per table group -- completions and the migration runner
(`db`), feedback, training runs, API keys, dashboard aggregates -- each holding its
tables, its migrations (appended in order to `db.MIGRATIONS`) and its queries.
`LogWriter` is the off-the-response-path write queue for completion rows. Nothing
here imports fastapi, torch or vllm; callers on the event loop use threads.
"""

from agentloop.serve.store.db import Store
from agentloop.serve.store.logwriter import LogWriter

__all__ = ["LogWriter", "Store"]
